"""Spend budgets, enforced at admission by two edges sharing Redis, with the official openai SDK:
a key or organization past its budget gets 429 insufficient_quota (no retry), others go on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid

import openai
import pytest
import redis.asyncio as redis

from auth_svc.store import Limits
from billing_svc.server import running_billing
from cloudach.errors import InvalidArgument
from edge.budgets import NANOS_PER_MICRO
from inference_svc.server import running_inference
from tests.fakes import FakeEngine
from tests.integration.services import MODEL, billing_config, inference_config, run_cli, running_edge
from tests.integration.test_billing import until

REDIS = os.environ.get("CLOUDACH_TEST_REDIS", "redis://127.0.0.1:6379/0")
#: dear tokens, so a few requests spend a budget: 1 micro-unit a prompt token, 2 an output token
PRICES = f"""
currency = "USD"
[models."{MODEL}"]
input_per_million_micros = 1_000_000
output_per_million_micros = 2_000_000
"""
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
#: what ASK holds at admission: its prompt estimate (4 characters a token, 4 a message) at 1, max_tokens at 2
HOLD = 4 * 1 + 5 * 2


@contextlib.asynccontextmanager
async def two_edges(registry, auth, tmp_path):
    """billing_svc with PRICES, inference_svc on the fake engine, and two edges sharing Redis."""
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    engine = FakeEngine(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * 5)
    async with running_billing(billing_config(tmp_path, auth, prices_file=str(prices))) as billing:
        async with running_inference(inference_config(auth), engine=engine, registry=registry) as inf:
            options = dict(billing_target=billing.address, redis_url=REDIS, prices_file=str(prices),
                           auth_cache_ttl_s=0.0)
            async with running_edge(inf.address, auth.address, **options) as first:
                async with running_edge(inf.address, auth.address, **options) as second:
                    yield billing, (first, second)


async def ask(url: str, key: str):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2)
    return await client.chat.completions.with_raw_response.create(**ASK)


async def test_a_key_past_its_daily_budget_gets_insufficient_quota_on_both_edges_and_another_key_works(
        registry, auth, tmp_path):
    org = f"o-{uuid.uuid4().hex[:6]}"
    capped_key, capped = await auth.store.create(org, "capped", Limits())
    _, free = await auth.store.create(org, "free", Limits())
    updated = await asyncio.to_thread(run_cli, "keys", "--auth-target", auth.address, "update", capped_key.key_id,
                                      "--budget-daily", "60")
    assert updated.returncode == 0, updated.stderr
    async with two_edges(registry, auth, tmp_path) as (billing, edges):
        spent, admitted = 0, 0
        for i in range(20):
            try:
                raw = await ask(edges[i % 2], capped)
            except openai.RateLimitError as error:
                refused = error  # the name "as" binds is gone after the block
                break
            # Admitted only with room for its hold on top of the spend so far.
            assert spent + HOLD <= 60
            usage = raw.parse().usage
            spent += usage.prompt_tokens + 2 * usage.completion_tokens
            admitted += 1
        else:
            pytest.fail("the capped key was never refused")
        # OpenAI's answer: 429 insufficient_quota, and the SDK told not to retry (one request only).
        assert refused.status_code == 429 and refused.code == "insufficient_quota"
        assert refused.body["type"] == "insufficient_quota" and refused.response.headers["x-should-retry"] == "false"
        assert admitted >= 1 and spent + HOLD > 60
        # Refused on the other edge too: they share the spend, in Redis.
        for url in edges:
            with pytest.raises(openai.RateLimitError) as again:
                await ask(url, capped)
            assert again.value.code == "insufficient_quota"
            assert (await ask(url, free)).http_response.status_code == 200
        client = redis.Redis.from_url(REDIS)
        try:
            names = [n async for n in client.scan_iter(f"cloudach:spend:{{{org}}}:key:{capped_key.key_id}:daily:*")]
            assert len(names) == 1 and int(await client.get(names[0])) == spent * NANOS_PER_MICRO
        finally:
            await client.aclose()

        # The ledger agrees with the spend the budget counted, once the records are delivered.
        async def billed() -> bool:
            buckets = await billing.store.usage("key_id", capped_key.key_id, 0, 2**62)
            return sum(b.requests for b in buckets) == admitted

        await until(billed)
        [bucket] = await billing.store.usage("key_id", capped_key.key_id, 0, 2**62)
        assert bucket.cost_micros == spent


async def test_an_organization_budget_caps_all_its_keys_and_a_negative_budget_is_refused(registry, auth, tmp_path):
    org = f"o-{uuid.uuid4().hex[:6]}"
    keys = [(await auth.store.create(org, f"k{i}", Limits()))[1] for i in range(2)]
    _, elsewhere = await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "other", Limits())
    negative = await asyncio.to_thread(run_cli, "keys", "--auth-target", auth.address, "org-budget", "--org", org,
                                       "--budget-daily", "-1")
    assert negative.returncode == 1 and "must not be negative" in negative.stderr
    with pytest.raises(InvalidArgument) as refused:
        await auth.store.create(org, "bad", Limits(budget_monthly_micros=-5))
    assert refused.value.param == "limits.budget_monthly_micros"
    set_ = await asyncio.to_thread(run_cli, "keys", "--auth-target", auth.address, "org-budget", "--org", org,
                                   "--budget-monthly", "45")
    assert set_.returncode == 0, set_.stderr
    async with two_edges(registry, auth, tmp_path) as (billing, edges):
        statuses = []
        for i in range(8):
            try:
                statuses.append((await ask(edges[i % 2], keys[i % 2])).http_response.status_code)
            except openai.RateLimitError as error:
                assert error.code == "insufficient_quota"
                statuses.append(429)
        assert statuses[0] == 200 and 429 in statuses
        assert statuses[statuses.index(429):] == [429] * (len(statuses) - statuses.index(429))  # spent stays spent
        assert (await ask(edges[0], elsewhere)).http_response.status_code == 200
