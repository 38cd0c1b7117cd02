"""Prompt-cache accounting and OpenAI's organization usage and costs APIs, over the real edge,
inference_svc and billing_svc: the sums are exact, the shapes OpenAI's."""

from __future__ import annotations

import json
import time
import uuid

import aiohttp
import pytest

from auth_svc.roles import ORG_ADMIN
from auth_svc.store import Limits
from billing_svc.config import BillingConfig
from cloudach.prices import Price, cost_micros, load_prices
from billing_svc.store import Grouping, Record, UsageStore
from inference_svc.server import running_inference
from tests.fakes import FakeEngine
from tests.integration.services import MODEL, inference_config, running_edge
from tests.integration.test_billing import CHAT, final_usage, post, until

PRICES = load_prices(BillingConfig().prices_file)
HOUR_MS = 3_600_000


def record(request_id: str, key: str, started_ms: int, prompt: int, cached: int, completion: int,
           model: str = MODEL, batch: str = "") -> Record:
    return Record(request_id, key, "acme", model, prompt, completion, "completed", started_ms, started_ms + 10, 1,
                  cached_tokens=cached, batch_id=batch)


async def test_the_ledger_sums_buckets_and_groups_exactly_with_cached_tokens_at_their_price(database):
    store = UsageStore(database)
    await store.migrate()
    price = Price(input_per_million_micros=200_000, output_per_million_micros=600_000,
                  cached_input_per_million_micros=50_000)
    start = 1_795_000_000_000
    rows = [record("a", "k1", start, 1000, 800, 10), record("b", "k2", start + 5, 7, 0, 3),
            record("c", "k1", start + HOUR_MS + 1, 64, 32, 5, batch="batch_1"),
            record("d", "k1", start + 2 * HOUR_MS, 1, 0, 1)]  # past the range's end
    for r in rows:
        assert await store.record(r, price)
    grouping = Grouping("acme", start, start + 2 * HOUR_MS, HOUR_MS)
    first, second = await store.aggregate(grouping)
    assert (first.bucket, first.requests, first.input_tokens, first.input_cached_tokens, first.output_tokens) == (0, 2, 1007, 800, 13)
    assert first.input_cost_picos == (200 + 7) * 200_000 and first.cached_input_cost_picos == 800 * 50_000
    assert first.output_cost_picos == 13 * 600_000
    assert second.bucket == 1 and second.requests == 1
    by_key = await store.aggregate(Grouping("acme", start, start + 2 * HOUR_MS, HOUR_MS, by_key=True, by_batch=True))
    assert [(g.bucket, g.key_id, g.batch, g.requests) for g in by_key] == [(0, "k1", False, 1), (0, "k2", False, 1),
                                                                            (1, "k1", True, 1)]
    only = await store.aggregate(Grouping("acme", start, start + 2 * HOUR_MS, HOUR_MS, key_ids=("k2",), batch=False))
    assert [(g.bucket, g.requests, g.input_tokens) for g in only] == [(0, 1, 7)]
    [day] = await store.usage("organization", "acme", start, start + 2 * HOUR_MS)
    assert day.cached_tokens == 832
    assert day.cost_micros == cost_micros(1071, 18, price, cached_tokens=832)


async def _get(session: aiohttp.ClientSession, url: str, key: str, path: str, params) -> tuple[int, dict]:
    async with session.get(f"{url}{path}", params=params, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json()


async def test_usage_and_costs_apis_return_openais_shapes_with_exact_sums(registry, auth, billing):
    org = f"o-{uuid.uuid4().hex[:6]}"
    admin_key, admin = await auth.store.create(org, "admin", Limits(), role=ORG_ADMIN)
    member_key, member = await auth.store.create(org, "member", Limits())
    cached = 3
    engine = FakeEngine(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * 4, cached_tokens=cached)
    since = int(time.time()) - 2
    reported = {"requests": 0, "input": 0, "cached": 0, "output": 0}
    async with running_inference(inference_config(auth), engine=engine, registry=registry) as inf:
        async with running_edge(inf.address, auth.address, billing_target=billing.address) as url:
            async with aiohttp.ClientSession() as session:
                for i in range(4):
                    body = {**CHAT, "stream": i % 2 == 0, "stream_options": {"include_usage": True}} if i % 2 == 0 \
                        else {**CHAT}
                    status, raw = await post(session, url, member if i < 3 else admin, body)
                    assert status == 200
                    usage = final_usage(raw)[1] if body.get("stream") else json.loads(raw)["usage"]
                    assert usage["prompt_tokens_details"]["cached_tokens"] == cached
                    reported["requests"] += 1
                    reported["input"] += usage["prompt_tokens"]
                    reported["cached"] += usage["prompt_tokens_details"]["cached_tokens"]
                    reported["output"] += usage["completion_tokens"]

                async def all_billed() -> bool:
                    status, body = await _get(session, url, admin, "/v1/usage", {"organization": org})
                    return body["total"]["requests"] == 4

                await until(all_billed)
                params = [("start_time", since), ("bucket_width", "1h"), ("group_by[]", "api_key_id"),
                          ("group_by[]", "model")]
                status, page = await _get(session, url, admin, "/v1/organization/usage/completions", params)
                assert status == 200 and page["object"] == "page" and page["has_more"] is False
                assert page["next_page"] is None
                [bucket] = page["data"]
                assert bucket["object"] == "bucket" and bucket["start_time"] == since
                results = bucket["results"]
                assert sorted(r["api_key_id"] for r in results) == sorted([member_key.key_id, admin_key.key_id])
                assert all(r["object"] == "organization.usage.completions.result" and r["model"] == MODEL
                           and r["project_id"] is None and r["batch"] is None for r in results)
                total = {"requests": sum(r["num_model_requests"] for r in results),
                         "input": sum(r["input_tokens"] for r in results),
                         "cached": sum(r["input_cached_tokens"] for r in results),
                         "output": sum(r["output_tokens"] for r in results)}
                assert total == reported
                [member_row] = [r for r in results if r["api_key_id"] == member_key.key_id]
                assert member_row["num_model_requests"] == 3

                # Costs: line items by model and kind, summing to what the price list says.
                status, costs = await _get(session, url, admin, "/v1/organization/costs",
                                           [("start_time", since), ("group_by[]", "line_item")])
                assert status == 200 and costs["object"] == "page"
                [day] = costs["data"]
                items = {r["line_item"]: r["amount"] for r in day["results"]}
                price = PRICES.price(MODEL)
                expected = {f"{MODEL}, input": (reported["input"] - reported["cached"]) * price.input_per_million_micros,
                            f"{MODEL}, cached input": reported["cached"] * price.cached_input,
                            f"{MODEL}, output": reported["output"] * price.output_per_million_micros}
                assert items == {item: {"value": picos // 1_000_000 / 1_000_000, "currency": "usd"}
                                 for item, picos in expected.items()}
                status, ungrouped = await _get(session, url, admin, "/v1/organization/costs", {"start_time": since})
                [whole] = ungrouped["data"][0]["results"]
                billed = cost_micros(reported["input"], reported["output"], price, reported["cached"])
                assert whole == {"object": "organization.costs.result", "line_item": None, "project_id": None,
                                 "amount": {"value": billed / 1_000_000, "currency": "usd"}}
                status, usage = await _get(session, url, admin, "/v1/usage", {"organization": org})
                assert usage["total"]["cost_micros"] == billed and usage["total"]["cached_tokens"] == reported["cached"]

                # A member key may not read them; bad parameters are a 400 naming the parameter.
                status, body = await _get(session, url, member, "/v1/organization/costs", {"start_time": since})
                assert status == 401 and "insufficient permissions" in body["error"]["message"]
                for path, params, param in (
                    ("/v1/organization/usage/completions", {}, "start_time"),
                    ("/v1/organization/usage/completions", {"start_time": since, "bucket_width": "1w"}, "bucket_width"),
                    ("/v1/organization/usage/completions", {"start_time": since, "group_by[]": "colour"}, "group_by"),
                    ("/v1/organization/usage/completions", {"start_time": since, "limit": "0"}, "limit"),
                    ("/v1/organization/usage/completions", {"start_time": since, "page": "nope"}, "page"),
                    ("/v1/organization/costs", {"start_time": since, "bucket_width": "1h"}, "bucket_width"),
                    ("/v1/organization/costs", {"start_time": since, "end_time": since}, "end_time"),
                ):
                    status, body = await _get(session, url, admin, path, params)
                    assert status == 400 and body["error"]["param"] == param, (path, params, body)


async def test_usage_pages_through_buckets_with_a_cursor(registry, auth, billing):
    org = f"o-{uuid.uuid4().hex[:6]}"
    admin = (await auth.store.create(org, "admin", Limits(), role=ORG_ADMIN))[1]
    engine = FakeEngine(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * 2)
    async with running_inference(inference_config(auth), engine=engine, registry=registry) as inf:
        async with running_edge(inf.address, auth.address, billing_target=billing.address) as url:
            async with aiohttp.ClientSession() as session:
                assert (await post(session, url, admin, CHAT))[0] == 200

                async def billed() -> bool:
                    return (await _get(session, url, admin, "/v1/usage", {"organization": org}))[1]["total"]["requests"] == 1

                await until(billed)
                now = int(time.time())
                start = now - 4 * 86_400 - 10  # five daily buckets, the last one holding the request
                seen, params = [], {"start_time": start, "end_time": now + 1, "limit": 2}
                while True:
                    status, page = await _get(session, url, admin, "/v1/organization/usage/completions", params)
                    assert status == 200
                    seen += page["data"]
                    if not page["has_more"]:
                        assert page["next_page"] is None
                        break
                    params = {**params, "page": page["next_page"]}
    assert [b["start_time"] for b in seen] == [start + i * 86_400 for i in range(5)]
    assert seen[-1]["end_time"] == now + 1
    assert [len(b["results"]) for b in seen] == [0, 0, 0, 0, 1]
    [only] = seen[-1]["results"]
    assert only["num_model_requests"] == 1 and only["api_key_id"] is None and only["model"] is None


@pytest.mark.triton
async def test_a_repeated_long_system_prompt_is_served_from_cache_and_billed_at_the_cached_rate(inference, auth,
                                                                                                   billing, triton):
    from openai import AsyncOpenAI

    from tests.integration.services import model_idle

    org = f"o-{uuid.uuid4().hex[:6]}"
    key = (await auth.store.create(org, "t", Limits()))[1]
    system = ("You are the support assistant of a small bicycle shop in Leith. Answer briefly and politely. "
              "The shop opens at nine and closes at six, Monday to Saturday; it repairs every kind of bicycle, "
              "sells second-hand frames, and rents tandems by the hour. Never promise a repair date. ") * 3
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Do you rent tandems?"}]
    async with running_edge(inference.address, auth.address, billing_target=billing.address) as url:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key=key)
        await model_idle(triton)
        cold = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        warm = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True,
                                                      stream_options={"include_usage": True})
        streamed = [chunk async for chunk in stream]
        assert cold.usage.prompt_tokens > 64
        assert warm.usage.prompt_tokens_details.cached_tokens > 0
        assert warm.usage.prompt_tokens_details.cached_tokens < warm.usage.prompt_tokens
        last = streamed[-1]
        assert last.choices == [] and last.usage.prompt_tokens_details.cached_tokens > 0
        for response in (warm, last):
            record = None

            async def stored(request_id=response.id) -> bool:
                nonlocal record
                record = await billing.store.get(request_id)
                return record is not None

            await until(stored)
            assert record.cached_tokens == response.usage.prompt_tokens_details.cached_tokens
        async with aiohttp.ClientSession() as session:
            admin_key = (await auth.store.create(org, "admin", Limits(), role=ORG_ADMIN))[1]
            status, usage = await _get(session, url, admin_key, "/v1/usage", {"organization": org})
    price = PRICES.price(MODEL)
    assert price.cached_input < price.input_per_million_micros
    responses = (cold.usage, warm.usage, last.usage)
    prompt, completion = sum(u.prompt_tokens for u in responses), sum(u.completion_tokens for u in responses)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in responses)
    assert usage["total"]["cached_tokens"] == cached
    assert usage["total"]["cost_micros"] == cost_micros(prompt, completion, price, cached)
    assert usage["total"]["cost_micros"] < cost_micros(prompt, completion, price)
