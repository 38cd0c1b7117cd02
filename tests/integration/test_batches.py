"""OpenAI's Batch API with the official openai SDK: files.create, batches.create / retrieve / list /
cancel, files.content; a batch survives its edge and billing_svc restarting mid-way, is billed at
the batch discount, and bad input is refused naming the parameter (or becomes its line's error)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid

import aiohttp
import openai
import pytest

from auth_svc.store import Limits
from billing_svc.config import BillingConfig
from billing_svc.server import running_billing
from cloudach.errors import Unavailable
from cloudach.prices import cost_micros, load_prices
from edge.batch_runner import MAX_ATTEMPTS
from inference_svc.server import running_inference
from tools.launcher.ports import free_ports
from tests.fakes import FakeEngine
from tests.integration.services import MODEL, batch_places, billing_config, inference_config, running_edge
from tests.integration.test_billing import until

PRICES = load_prices(BillingConfig().prices_file)


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_line(i: int, url: str = "/v1/chat/completions", **body) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": url,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 4, **body}}


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key)


async def wait_for(sdk: openai.AsyncOpenAI, batch_id: str, statuses: tuple[str, ...], timeout_s: float = 60):
    async with asyncio.timeout(timeout_s):
        while (batch := await sdk.batches.retrieve(batch_id)).status not in statuses:
            await asyncio.sleep(0.2)
    return batch


def engine(registry, delay_s: float) -> FakeEngine:
    return FakeEngine(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * 4, delay_s=delay_s)


async def test_a_20_line_batch_completes_through_an_edge_and_billing_restart_billed_at_the_batch_rate(
        registry, auth, tmp_path):
    _, key = await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "batcher", Limits())
    [billing_port] = free_ports(1)
    billing_settings = billing_config(tmp_path, auth, listen_address=f"127.0.0.1:{billing_port}")
    # The edge restarted is the same edge: its batch database, files and usage outbox stay.
    edge = dict(billing_target=f"127.0.0.1:{billing_port}", batch_lease_s=2.0,
                outbox_path=str(tmp_path / "outbox.db"), **batch_places(tmp_path / "batches"))
    lines = [chat_line(i) for i in range(20)]
    async with running_inference(inference_config(auth), engine=engine(registry, 0.05), registry=registry) as inf:
        async with contextlib.AsyncExitStack() as billing_running:
            await billing_running.enter_async_context(running_billing(billing_settings))
            async with running_edge(inf.address, auth.address, **edge) as url:
                sdk = client(url, key)
                uploaded = await sdk.files.create(file=("requests.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
                assert uploaded.object == "file" and uploaded.purpose == "batch"
                assert uploaded.bytes == len(jsonl(lines))
                batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                 completion_window="24h", metadata={"job": "nightly"})
                assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
                assert batch.expires_at == batch.created_at + 86_400
                async with asyncio.timeout(60):
                    while (await sdk.batches.retrieve(batch.id)).request_counts.completed < 4:
                        await asyncio.sleep(0.1)
                await billing_running.aclose()  # billing_svc stops mid-batch; the edge runs on...
                async with asyncio.timeout(60):
                    while (await sdk.batches.retrieve(batch.id)).request_counts.completed < 8:
                        await asyncio.sleep(0.1)
            # ...and then stops too, mid-batch.
        async with running_billing(billing_settings) as billing:  # billing_svc back, on its database
            async with running_edge(inf.address, auth.address, **edge) as url:  # the edge back: it takes the batch up
                sdk = client(url, key)
                stopped_at = (await sdk.batches.retrieve(batch.id)).request_counts.completed
                finished = await wait_for(sdk, batch.id, ("completed", "failed"))
                assert finished.status == "completed" and 8 <= stopped_at < 20
                counts = finished.request_counts
                assert (counts.total, counts.completed, counts.failed) == (20, 20, 0)
                assert finished.error_file_id is None and finished.completed_at >= finished.in_progress_at
                content = await sdk.files.content(finished.output_file_id)
                output = [json.loads(line) for line in content.text.splitlines()]
                assert batch.id in [b.id for b in (await sdk.batches.list(limit=5)).data]
                ids = [o["response"]["request_id"] for o in output]

                async def billed() -> bool:
                    return all([await billing.store.get(i) for i in ids])

                await until(billed, 30)  # every request once, those of the stopped edge's outbox too
                records = [await billing.store.get(i) for i in ids]
    assert sorted(o["custom_id"] for o in output) == sorted(line["custom_id"] for line in lines)
    assert len({o["id"] for o in output}) == 20
    for o in output:
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert o["response"]["body"]["object"] == "chat.completion"
        assert o["response"]["body"]["choices"][0]["message"]["content"]
    assert all(r.batch_id == batch.id and r.outcome == "completed" for r in records)
    usage = await billing_usage(billing_settings, records)
    price = PRICES.billed(MODEL, "completed", batch=True)
    assert usage == cost_micros(sum(r.prompt_tokens for r in records), sum(r.completion_tokens for r in records), price)


async def billing_usage(settings, records) -> int:
    """The ledger's cost of the records' key, read from billing_svc's database."""
    from billing_svc.store import UsageStore
    from cloudach.db import Database

    db = Database(settings.database_url)
    try:
        [bucket] = await UsageStore(db).usage("key_id", records[0].key_id, 0, 2**62)
        assert bucket.requests == len(records)
        return bucket.cost_micros
    finally:
        await db.close()


async def test_a_cancelled_batch_stops(registry, auth, tmp_path):
    _, key = await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "batcher", Limits())
    slow = engine(registry, 0.1)
    async with running_inference(inference_config(auth), engine=slow, registry=registry) as inf:
        async with running_edge(inf.address, auth.address, **batch_places(tmp_path)) as url:
            sdk = client(url, key)
            uploaded = await sdk.files.create(file=("r.jsonl", io.BytesIO(jsonl([chat_line(i) for i in range(20)]))),
                                              purpose="batch")
            batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                             completion_window="24h")
            async with asyncio.timeout(60):
                while (await sdk.batches.retrieve(batch.id)).request_counts.completed < 2:
                    await asyncio.sleep(0.05)
            cancelling = await sdk.batches.cancel(batch.id)
            assert cancelling.status in ("cancelling", "cancelled")
            cancelled = await wait_for(sdk, batch.id, ("cancelled",))
            ran = len(slow.requests)
            await asyncio.sleep(1.0)
            assert len(slow.requests) == ran  # nothing more runs
            counts = cancelled.request_counts
            assert counts.total == 20 and 2 <= counts.completed < 20 and counts.completed + counts.failed == 20
            errors = [json.loads(line) for line in (await sdk.files.content(cancelled.error_file_id)).text.splitlines()]
            assert all(e["error"]["code"] == "batch_cancelled" and e["response"] is None for e in errors)
            assert cancelled.cancelled_at is not None and ran < 20


async def test_bad_batch_input_is_refused_naming_the_parameter_or_becomes_the_lines_error(registry, auth, tmp_path):
    _, key = await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "batcher", Limits())
    async with running_inference(inference_config(auth), engine=engine(registry, 0.0), registry=registry) as inf:
        async with running_edge(inf.address, auth.address, **batch_places(tmp_path), max_batch_line_bytes=2000) as url:
            sdk = client(url, key)
            good = jsonl([chat_line(0)])
            for data, code in ((b'{"custom_id": "a", "method": "POST"\n', "invalid_json_line"),
                               (jsonl([chat_line(1), chat_line(1)]), "duplicate_custom_id"),
                               (jsonl([chat_line(2, messages=[{"role": "user", "content": "x" * 3000}])]),
                                "line_too_large"),
                               (jsonl([chat_line(3, url="/v1/embeddings")]), "invalid_url"),
                               (b"\n\n", "empty_file")):
                with pytest.raises(openai.BadRequestError) as refused:
                    await sdk.files.create(file=("r.jsonl", io.BytesIO(data)), purpose="batch")
                assert refused.value.body["param"] == "file" and refused.value.code == code
            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.files.create(file=("r.jsonl", io.BytesIO(good)), purpose="fine-tune")
            assert refused.value.body["param"] == "purpose"
            uploaded = await sdk.files.create(file=("r.jsonl", io.BytesIO(good)), purpose="batch")
            for kwargs, param in (({"input_file_id": "file-nope"}, "input_file_id"),
                                  ({"endpoint": "/v1/embeddings"}, "endpoint"),
                                  ({"completion_window": "1h"}, "completion_window"),
                                  ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata")):
                arguments = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
                             "completion_window": "24h", **kwargs}
                with pytest.raises(openai.BadRequestError) as refused:
                    await sdk.batches.create(**arguments)
                assert refused.value.body["param"] == param
            with pytest.raises(openai.NotFoundError):
                await sdk.batches.retrieve("batch_nope")
            # Forms and parameters that do not parse are 400s, never 500s.
            surrogate = b'{"custom_id": "\\ud800", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.files.create(file=("r.jsonl", io.BytesIO(surrogate)), purpose="batch")
            assert refused.value.code == "invalid_json_line"
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
                async with session.post(f"{url}/v1/files", data=b"--x\r\nnonsense",
                                        headers={"Content-Type": "multipart/form-data"}) as reply:
                    assert reply.status == 400 and (await reply.json())["error"]["param"] == "file"
                async with session.get(f"{url}/v1/batches", params={"limit": "\u00b2"}) as reply:
                    assert reply.status == 400 and (await reply.json())["error"]["param"] == "limit"
            # Lines run alone: a url not the batch's endpoint and a body the endpoint refuses fail
            # as their lines' errors; the good line is answered.
            mixed = jsonl([chat_line(0), chat_line(1, url="/v1/completions"), chat_line(2, temperature=9)])
            uploaded = await sdk.files.create(file=("r.jsonl", io.BytesIO(mixed)), purpose="batch")
            batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                             completion_window="24h")
            done = await wait_for(sdk, batch.id, ("completed",))
            assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
            errors = {e["custom_id"]: e for e in map(json.loads, (await sdk.files.content(done.error_file_id)).text.splitlines())}
            assert errors["req-1"]["error"]["code"] == "invalid_url" and errors["req-1"]["response"] is None
            assert errors["req-2"]["response"]["status_code"] == 400
            assert errors["req-2"]["response"]["body"]["error"]["param"] == "temperature"
            [answered] = (await sdk.files.content(done.output_file_id)).text.splitlines()
            assert json.loads(answered)["custom_id"] == "req-0"


def test_the_batch_price_is_discounted_and_rounded_down():
    from cloudach.prices import Price, PriceList

    prices = PriceList("USD", {MODEL: Price(333, 777, 101)}, batch_discount_percent=30)
    assert prices.billed(MODEL, "completed", batch=True) == Price(233, 543, 70)  # 333*0.7=233.1 ...
    assert prices.billed(MODEL, "completed") == Price(333, 777, 101)
    assert prices.billed(MODEL, "failed_mid_stream", batch=True) == Price(0, 0, 0)
    assert PRICES.batch_discount_percent == 50  # the shipped list's


class Flaky(FakeEngine):
    """Fails its first `failures` generations as a restarting model does (UNAVAILABLE), then answers;
    with forever, always fails with an error of ours (a 500)."""

    def __init__(self, registry, failures: int = 0, forever: bool = False) -> None:
        super().__init__(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * 3)
        self.failures, self.forever, self.calls = failures, forever, 0

    async def generate(self, request):
        self.calls += 1
        if self.forever:
            raise RuntimeError("a bug of ours")
        if self.calls <= self.failures:
            raise Unavailable("the model is restarting")
        async for step in super().generate(request):
            yield step


async def run_batch(registry, auth, tmp_path, engine, lines: int) -> tuple:
    _, key = await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "batcher", Limits())
    async with running_inference(inference_config(auth), engine=engine, registry=registry) as inf:
        async with running_edge(inf.address, auth.address, **batch_places(tmp_path), batch_retry_s=0.05) as url:
            sdk = client(url, key)
            uploaded = await sdk.files.create(file=("r.jsonl", io.BytesIO(jsonl([chat_line(i) for i in range(lines)]))),
                                              purpose="batch")
            batch = await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                             completion_window="24h")
            done = await wait_for(sdk, batch.id, ("completed",))
            errors = [] if done.error_file_id is None else \
                [json.loads(e) for e in (await sdk.files.content(done.error_file_id)).text.splitlines()]
    return done, errors


async def test_a_model_restarting_delays_a_batch_and_fails_none_of_its_lines(registry, auth, tmp_path):
    flaky = Flaky(registry, failures=7)  # more than MAX_ATTEMPTS: passing failures are retried until the window ends
    done, errors = await run_batch(registry, auth, tmp_path, flaky, 2)
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 0) and not errors
    assert flaky.calls == 7 + 2


async def test_a_request_that_keeps_failing_with_a_500_is_retried_then_fails_its_line_alone(registry, auth, tmp_path):
    broken = Flaky(registry, forever=True)
    done, errors = await run_batch(registry, auth, tmp_path, broken, 2)
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 2)
    assert [e["response"]["status_code"] for e in errors] == [500, 500]
    assert broken.calls == 2 * MAX_ATTEMPTS  # each tried MAX_ATTEMPTS times, then given up
