"""Billing: every request that reached inference is billed exactly once, whatever fails."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import uuid

import aiohttp
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from auth_svc.store import Limits
from cloudach.prices import Price, cost_micros
from billing_svc.server import running_billing
from billing_svc.store import Record, UsageStore
from cloudach.billing.v1 import billing_pb2 as pb
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from tools.launcher.ports import free_ports
from tools.launcher.probes import wait_http_ok
from cloudach.outbox import UsageOutbox
from cloudach.tokens import ALL_ORGANIZATIONS, USAGE_READ
from inference_svc.server import running_inference
from tests.integration.services import (API_KEY, MODEL, billing_config, inference_config, run_cli,
                                        running_edge, service_key_file, service_token)
from tests.fakes import FakeEngine

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}


def engine(registry, delay_s=0.0, words=5, cached_tokens=0):
    return FakeEngine(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * words, delay_s=delay_s,
                      cached_tokens=cached_tokens)


async def until(predicate, timeout_s=15.0):
    """Polls an async predicate until it holds (deliveries are asynchronous by design)."""
    async with asyncio.timeout(timeout_s):
        while not await predicate():
            await asyncio.sleep(0.1)


def record(request_id: str, org="acme", prompt=10, completion=20) -> Record:
    return Record(request_id, "key_1", org, MODEL, prompt, completion, "completed", 1_795_000_000_000, 1_795_000_001_000, 5)


async def test_records_are_stored_once_and_costed_in_integer_micros(database):  # noqa: F811
    store = UsageStore(database)
    await store.migrate()
    price = Price(input_per_million_micros=200_000, output_per_million_micros=600_000)
    assert await store.record(record("r1"), price)
    assert not await store.record(record("r1", prompt=999), price)  # a duplicate changes nothing
    assert await store.record(record("r2", prompt=1, completion=1), price)
    assert await store.record(record("r3", org="globex"), price)
    [bucket] = await store.usage("organization", "acme", 0, 2**62)
    assert (bucket.requests, bucket.prompt_tokens, bucket.completion_tokens) == (2, 11, 21)
    assert bucket.cost_micros == cost_micros(11, 21, price) == (11 * 200_000 + 21 * 600_000) // 1_000_000
    assert isinstance(bucket.cost_micros, int) and bucket.day == "2026-11-18"


async def test_a_batch_request_run_again_after_a_run_that_did_not_complete_is_billed_for_the_run_that_did(database):  # noqa: F811
    store = UsageStore(database)
    await store.migrate()
    price = Price(input_per_million_micros=200_000, output_per_million_micros=600_000)
    cut = dataclasses.replace(record("b1", completion=3), outcome="cancelled_by_client", batch_id="batch_x")
    assert await store.record(cut, price)
    assert await store.record(dataclasses.replace(cut, outcome="completed", completion_tokens=20), price)
    assert not await store.record(dataclasses.replace(cut, outcome="completed", completion_tokens=99), price)
    billed = await store.get("b1")
    assert (billed.outcome, billed.completion_tokens) == ("completed", 20)
    # An interactive request's record is never replaced by another with its id.
    assert await store.record(dataclasses.replace(record("i1"), outcome="cancelled_by_client"), price)
    assert not await store.record(record("i1"), price)


async def test_a_request_only_inference_reported_is_reconstructed_and_the_edges_record_replaces_it(database):  # noqa: F811
    store = UsageStore(database)
    await store.migrate()
    price = Price(input_per_million_micros=200_000, output_per_million_micros=600_000)
    cut = record("cut", prompt=10, completion=0)
    # A legacy completion of two prompts: two generations of one request, each reported once.
    assert await store.report("cut-0", dataclasses.replace(cut, completion_tokens=7, outcome="cancelled_by_client"), 1_000)
    assert await store.report("cut-1", dataclasses.replace(cut, completion_tokens=4, outcome="cancelled_by_client"), 2_000)
    assert not await store.report("cut-1", dataclasses.replace(cut, completion_tokens=99), 3_000)  # redelivered
    assert await store.report("late", record("late"), 9_000)  # its reports have not settled yet
    assert await store.record(record("done"), price)
    assert await store.report("done", record("done", completion=21), 1_000)  # the edge's record wins
    assert await store.reconcile(settled_before_ms=5_000) == 1
    assert await store.reconcile(settled_before_ms=5_000) == 0  # idempotent (replicas may all run it)
    # Settled reports of requests in the ledger are dropped; the unsettled one waits.
    assert await database.fetchall("SELECT generation_id FROM generation_reports") == [("late",)]
    got = await store.get("cut")
    assert (got.prompt_tokens, got.completion_tokens, got.outcome) == (20, 11, "interrupted")
    [bucket] = await store.usage("organization", "acme", 0, 2**62)
    assert (bucket.requests, bucket.completion_tokens) == (2, 31) and bucket.cost_micros == cost_micros(10, 20, price)
    # The edge's record arriving late replaces the reconstruction; a second copy changes nothing.
    assert await store.record(dataclasses.replace(record("cut", prompt=20, completion=9), outcome="cancelled_by_client"), price)
    assert not await store.record(record("cut", prompt=1, completion=1), price)
    got = await store.get("cut")
    assert (got.completion_tokens, got.outcome) == (9, "cancelled_by_client")


async def test_a_duplicated_delivery_does_not_double_count(billing, auth):
    stamp = Timestamp(seconds=1_795_000_000)
    message = pb.UsageRecord(request_id=f"dup-{uuid.uuid4().hex}", key_id="k", organization="dup-org", model=MODEL,
                             prompt_tokens=3, completion_tokens=4, outcome=pb.OUTCOME_COMPLETED,
                             started_at=stamp, ended_at=stamp)
    async with grpc.aio.insecure_channel(billing.address) as channel:
        stub = BillingServiceStub(channel)
        metadata = (("authorization", f"Bearer {service_token(auth, USAGE_READ, ALL_ORGANIZATIONS)}"),)
        first = await stub.RecordUsage(pb.RecordUsageRequest(record=message), metadata=metadata)
        again = await stub.RecordUsage(pb.RecordUsageRequest(record=message), metadata=metadata)
        usage = await stub.GetUsage(pb.GetUsageRequest(organization="dup-org"), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await stub.RecordUsage(pb.RecordUsageRequest(record=message))
    assert first.created and not again.created
    assert (usage.total.requests, usage.total.prompt_tokens) == (1, 3)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def post(session, url, key, body):
    async with session.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.read()


def final_usage(raw: bytes) -> tuple[str, dict]:
    chunks = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    return chunks[0]["id"], chunks[-1]["usage"]


async def test_the_billed_record_equals_the_usage_the_stream_reported(registry, auth, billing):
    key = (await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "t", Limits()))[1]
    async with running_inference(inference_config(auth), engine=engine(registry), registry=registry) as inf:
        async with running_edge(inf.address, auth.address, billing_target=billing.address) as url:
            async with aiohttp.ClientSession() as session:
                status, raw = await post(session, url, key, {**CHAT, "stream": True, "user": "end-user-42",
                                                             "stream_options": {"include_usage": True}})
            request_id, usage = final_usage(raw)
            await until(lambda: billing.store.get(request_id))
    billed = await billing.store.get(request_id)
    assert status == 200 and billed.outcome == "completed" and billed.user == "end-user-42"
    assert (billed.prompt_tokens, billed.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert billed.model == MODEL and billed.time_to_first_token_ns > 0


async def test_n_choices_are_billed_and_limited_as_the_prompt_once_and_every_choices_tokens(registry, auth, billing):
    key = (await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "t", Limits()))[1]
    async with running_inference(inference_config(auth), engine=engine(registry), registry=registry) as inf:
        async with running_edge(inf.address, auth.address, billing_target=billing.address) as url:
            async with aiohttp.ClientSession() as session:
                _, one = await post(session, url, key, {**CHAT, "stream": True})
                status, three = await post(session, url, key, {**CHAT, "n": 3, "stream": True})
            _, usage_one = final_usage(one)
            request_id, usage = final_usage(three)
            await until(lambda: billing.store.get(request_id))
    billed = await billing.store.get(request_id)
    assert status == 200 and usage["prompt_tokens"] == usage_one["prompt_tokens"]
    assert usage["completion_tokens"] == 3 * usage_one["completion_tokens"]
    assert (billed.prompt_tokens, billed.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])


async def test_billing_down_for_50_requests_then_back_gets_all_50_once(registry, auth, tmp_path):
    (port,) = free_ports(1)
    config = billing_config(tmp_path, auth, listen_address=f"127.0.0.1:{port}")
    org = f"o-{uuid.uuid4().hex[:6]}"
    key = (await auth.store.create(org, "t", Limits()))[1]
    async with running_inference(inference_config(auth), engine=engine(registry), registry=registry) as inf:
        outbox_path = str(tmp_path / "outbox.db")
        async with running_edge(inf.address, auth.address, billing_target=f"127.0.0.1:{port}", outbox_path=outbox_path) as url:
            async with aiohttp.ClientSession() as session:
                results = await asyncio.gather(*(post(session, url, key, CHAT) for _ in range(50)))
            assert [s for s, _ in results] == [200] * 50
            waiting = UsageOutbox(outbox_path)
            assert await waiting.depth() == 50  # nothing lost while billing_svc is down
            await waiting.close()
            async with running_billing(config) as billing:
                await until(lambda: _total_requests(billing.store, org, 50))
                await asyncio.sleep(1.0)  # any second delivery would land now
                [bucket] = await billing.store.usage("organization", org, 0, 2**62)
    assert bucket.requests == 50
    assert bucket.completion_tokens == sum(json.loads(raw)["usage"]["completion_tokens"] for _, raw in results)


async def _total_requests(store: UsageStore, org: str, expected: int) -> bool:
    buckets = await store.usage("organization", org, 0, 2**62)
    return sum(b.requests for b in buckets) == expected


async def test_records_in_the_outbox_survive_a_sigkilled_edge(registry, auth, tmp_path):
    (billing_port, edge_port) = free_ports(2)
    org = f"o-{uuid.uuid4().hex[:6]}"
    key = (await auth.store.create(org, "t", Limits()))[1]
    outbox_path = tmp_path / "outbox.db"
    async with running_inference(inference_config(auth), engine=engine(registry), registry=registry) as inf:
        env = {**os.environ, "CLOUDACH_PORT": str(edge_port), "CLOUDACH_INFERENCE_TARGET": inf.address,
               "CLOUDACH_AUTH_TARGET": auth.address, "CLOUDACH_BILLING_TARGET": f"127.0.0.1:{billing_port}",
               "CLOUDACH_EDGE_OUTBOX_PATH": str(outbox_path), "CLOUDACH_EDGE_SERVICE_KEY_FILE": str(service_key_file()),
               "CLOUDACH_EDGE_OUTBOX_MAX_BACKOFF_S": "0.5", "CLOUDACH_EDGE_METRICS_PORT": "0"}

        def start_edge() -> subprocess.Popen:
            log = open(tmp_path / "edge.log", "ab")
            return subprocess.Popen([sys.executable, "-m", "edge"], env=env, stdout=log, stderr=subprocess.STDOUT)

        edge = start_edge()
        try:
            await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{edge_port}/health", 30, edge)
            async with aiohttp.ClientSession() as session:
                results = await asyncio.gather(*(post(session, f"http://127.0.0.1:{edge_port}", key, CHAT) for _ in range(7)))
            assert [s for s, _ in results] == [200] * 7
            edge.send_signal(signal.SIGKILL)
            edge.wait()
            waiting = UsageOutbox(str(outbox_path))
            assert await waiting.depth() == 7
            await waiting.close()
            async with running_billing(billing_config(tmp_path, auth, listen_address=f"127.0.0.1:{billing_port}")) as billing:
                edge = start_edge()
                await until(lambda: _total_requests(billing.store, org, 7))
        finally:
            edge.kill()
            edge.wait()


async def test_organization_totals_equal_the_sum_of_the_responses_usage(registry, auth, billing):
    orgs = [f"o-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    keys = {org: (await auth.store.create(org, "t", Limits()))[1] for org in orgs}
    async with running_inference(inference_config(auth), engine=engine(registry, words=8), registry=registry) as inf:
        async with running_edge(inf.address, auth.address, billing_target=billing.address) as url:
            async with aiohttp.ClientSession() as session:
                reported = {org: [0, 0, 0] for org in orgs}
                for i in range(6):
                    org = orgs[i % 2]
                    body = {**CHAT, "max_tokens": 3 + i, "stream": i % 3 == 0}
                    if body["stream"]:
                        body["stream_options"] = {"include_usage": True}
                    status, raw = await post(session, url, keys[org], body)
                    usage = final_usage(raw)[1] if body["stream"] else json.loads(raw)["usage"]
                    reported[org][0] += 1
                    reported[org][1] += usage["prompt_tokens"]
                    reported[org][2] += usage["completion_tokens"]
                for org in orgs:
                    await until(lambda org=org: _total_requests(billing.store, org, reported[org][0]))
                    async with session.get(f"{url}/v1/usage", params={"organization": org},
                                           headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                        body = await r.json()
                    total = body["total"]
                    assert [total["requests"], total["prompt_tokens"], total["completion_tokens"]] == reported[org]
                    assert body["data"][0]["model"] == MODEL and isinstance(total["cost_micros"], int)
                # Someone else's organization is not for a non-admin key.
                async with session.get(f"{url}/v1/usage", params={"organization": orgs[1]},
                                       headers={"Authorization": f"Bearer {keys[orgs[0]]}"}) as r:
                    assert r.status == 403


@pytest.mark.parametrize("query, param", [
    ({"start_time": "9223372036854775807"}, "start_time"),
    ({"end_time": "-1"}, "end_time"),
    ({"start_time": "1700000000", "end_time": "1600000000"}, "end_time"),
    ({"start_time": "yesterday"}, "start_time"),
])
async def test_usage_time_ranges_are_checked(registry, auth, billing, query, param):
    async with running_inference(inference_config(auth), engine=engine(registry), registry=registry) as inf:
        async with running_edge(inf.address, auth.address, billing_target=billing.address) as url:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/v1/usage", params=query,
                                       headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                    status, body = r.status, await r.json()
    assert status == 400 and body["error"]["param"] == param


async def test_a_model_missing_from_the_price_list_is_recorded_and_alerted_on(auth, billing, caplog):
    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from cloudach.billing.v1 import billing_pb2, billing_pb2_grpc

    started = Timestamp(seconds=1_700_000_000)
    record = billing_pb2.UsageRecord(request_id=f"r-{uuid.uuid4().hex}", key_id="k", organization="o", model="mystery-1",
                                     prompt_tokens=5, completion_tokens=7, outcome=billing_pb2.OUTCOME_COMPLETED,
                                     started_at=started, ended_at=started)
    metadata = (("authorization", f"Bearer {service_token(auth)}"),)
    async with grpc.aio.insecure_channel(billing.address) as channel:
        reply = await billing_pb2_grpc.BillingServiceStub(channel).RecordUsage(
            billing_pb2.RecordUsageRequest(record=record), metadata=metadata)
    assert reply.created and (await billing.store.get(record.request_id)).completion_tokens == 7
    assert "UNPRICED MODEL" in caplog.text and "mystery-1" in caplog.text
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{billing.grpc.metrics_port}/metrics") as r:
            assert "cloudach_billing_unpriced_records_total 1.0" in await r.text()


async def test_a_client_that_leaves_is_billed_for_the_prompt_and_what_was_generated(registry, auth, billing):
    key = (await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "t", Limits()))[1]
    async with running_inference(inference_config(auth), engine=engine(registry, delay_s=0.05, words=200,
                                                                       cached_tokens=2), registry=registry) as inf:
        async with running_edge(inf.address, auth.address, billing_target=billing.address) as url:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 200, "stream": True},
                                        headers={"Authorization": f"Bearer {key}"}) as r:
                    first = json.loads((await r.content.readuntil(b"\n\n"))[6:])
                    for _ in range(3):
                        await r.content.readuntil(b"\n\n")
            await until(lambda: billing.store.get(first["id"]))
    billed = await billing.store.get(first["id"])
    assert billed.outcome == "cancelled_by_client"
    assert billed.prompt_tokens > 0 and 3 <= billed.completion_tokens < 200
    assert billed.cached_tokens == 2  # told with the first token: a cut stream keeps its cached price


async def test_cli_usage_prints_the_same_numbers(registry, auth, billing):
    org = f"o-{uuid.uuid4().hex[:6]}"
    stamp = Timestamp(seconds=1_795_000_000)
    async with grpc.aio.insecure_channel(billing.address) as channel:
        await BillingServiceStub(channel).RecordUsage(pb.RecordUsageRequest(record=pb.UsageRecord(
            request_id=f"cli-{uuid.uuid4().hex}", key_id="k", organization=org, model=MODEL, prompt_tokens=1000,
            completion_tokens=2000, outcome=pb.OUTCOME_COMPLETED, started_at=stamp, ended_at=stamp)),
            metadata=(("authorization", f"Bearer {service_token(auth)}"),))
    args = ["usage", "--auth-target", auth.address, "--billing-target", billing.address, "--org", org]
    as_json = await asyncio.to_thread(run_cli, *args, "--json")
    body = json.loads(as_json.stdout)
    assert body["total"]["prompt_tokens"] == 1000 and body["total"]["cost_micros"] == (1000 * 10_000 + 2000 * 20_000) // 1_000_000
    table = (await asyncio.to_thread(run_cli, *args)).stdout
    assert "2026-11-18" in table and "1000" in table and "2000" in table


async def test_a_stream_that_fails_mid_way_is_billed_as_failed(registry, auth, billing):
    from cloudach.errors import Unavailable

    key = (await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "t", Limits()))[1]
    failing = FakeEngine(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * 10, fail_after=4, error=Unavailable("gone"))
    async with running_inference(inference_config(auth), engine=failing, registry=registry) as inf:
        async with running_edge(inf.address, auth.address, billing_target=billing.address) as url:
            async with aiohttp.ClientSession() as session:
                status, raw = await post(session, url, key, {**CHAT, "max_tokens": 50, "stream": True})
            request_id = json.loads(raw.split(b"\n\n")[0][6:])["id"]
            assert status == 200 and b'"error"' in raw
            await until(lambda: billing.store.get(request_id))
    billed = await billing.store.get(request_id)
    assert billed.outcome == "failed_mid_stream" and billed.prompt_tokens > 0 and billed.completion_tokens == 4
    # Recorded with its tokens, priced at zero: the failure was ours, not the customer's.
    org_usage = await billing.store.usage("key_id", billed.key_id, 0, 2**62)
    assert sum(b.prompt_tokens for b in org_usage) > 0 and sum(b.cost_micros for b in org_usage) == 0
