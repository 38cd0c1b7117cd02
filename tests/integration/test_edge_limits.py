"""The edge's keys and limits: 401s, revocation within the cache TTL, auth_svc outages, keys
never logged, and per-key rate limits in-process and in Redis (two edge processes sharing one)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import uuid

import aiohttp
import pytest
from openai import OpenAI, RateLimitError

from auth_svc.server import running_auth
from auth_svc.store import Limits
from tools.launcher.ports import free_ports
from tools.launcher.probes import wait_http_ok
from inference_svc.server import running_inference
from tests.integration.services import API_KEY, MODEL, SERVICE_KEY, auth_config, edge_over_fake, inference_config, running_edge
from tests.fakes import FakeEngine

REDIS = os.environ.get("CLOUDACH_TEST_REDIS", "redis://127.0.0.1:6379/0")
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}


def engine(registry, delay_s=0.0):
    return FakeEngine(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * 3, delay_s=delay_s)


async def post(session, url, key, body=CHAT):
    async with session.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, r.headers, await r.read()


async def new_key(auth, **limits) -> str:
    return (await auth.store.create(f"org-{uuid.uuid4().hex[:6]}", "test", Limits(**limits)))[1]


async def revoke(auth, secret: str) -> None:
    await auth.store.revoke((await auth.store.find_active(secret)).key_id)


# -- keys --------------------------------------------------------------------------------------


async def test_missing_malformed_unknown_and_revoked_keys_are_401(registry, auth):
    revoked_key = await new_key(auth)
    await revoke(auth, revoked_key)
    async with edge_over_fake(engine(registry), registry, auth) as url:
        async with aiohttp.ClientSession() as session:
            results = {}
            for name, header in {"missing": None, "not bearer": f"Basic {API_KEY}", "empty": "Bearer ",
                                 "unknown": "Bearer ck-" + "x" * 43, "revoked": f"Bearer {revoked_key}",
                                 # a service's identity is not an API key (it may only report usage)
                                 "service key": f"Bearer {SERVICE_KEY}"}.items():
                headers = {"Authorization": header} if header else {}
                async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers) as r:
                    results[name] = (r.status, json.loads(await r.read())["error"]["code"])
    assert results == {name: (401, "invalid_api_key") for name in results}


async def test_a_revoked_key_stops_working_within_the_cache_ttl(registry, auth):
    key = await new_key(auth)
    async with edge_over_fake(engine(registry), registry, auth, auth_cache_ttl_s=1.0) as url:
        async with aiohttp.ClientSession() as session:
            assert (await post(session, url, key))[0] == 200
            await revoke(auth, key)
            assert (await post(session, url, key))[0] == 200  # still cached: at most one TTL more
            await asyncio.sleep(1.2)
            assert (await post(session, url, key))[0] == 401


async def test_while_auth_svc_is_down_cached_keys_work_and_unknown_ones_get_503(registry, tmp_path):
    (port,) = free_ports(1)
    config = auth_config(tmp_path, listen_address=f"127.0.0.1:{port}")
    async with running_auth(config) as own_auth:
        key = await new_key(own_auth)
        other = await new_key(own_auth)
        async with running_inference(inference_config(own_auth), engine=engine(registry), registry=registry) as inf:
            async with running_edge(inf.address, own_auth.address, auth_cache_ttl_s=30) as url:
                async with aiohttp.ClientSession() as session:
                    assert (await post(session, url, key))[0] == 200
                    # inference_svc has the signing keys cached; the edge has this key's token cached
                    await own_auth.grpc.stop(0)
                    status, _, _ = await post(session, url, key)
                    assert status == 200
                    status, headers, raw = await post(session, url, other)
                    assert status == 503 and headers["Retry-After"] == "1"
                    assert json.loads(raw)["error"]["type"] == "server_error"


async def test_keys_never_reach_a_log_line(registry, auth, caplog):
    caplog.set_level(logging.DEBUG)
    key = await new_key(auth)
    revoked = await new_key(auth)
    await revoke(auth, revoked)
    async with edge_over_fake(engine(registry), registry, auth) as url:
        async with aiohttp.ClientSession() as session:
            for k in (key, revoked, "ck-" + "z" * 43, API_KEY):
                await post(session, url, k)
                await post(session, url, k, {**CHAT, "temperature": 7})
    text = caplog.text
    assert "POST /v1/chat/completions" in text  # the access log did record these requests
    for secret in (key, revoked, "ck-" + "z" * 43, API_KEY):
        assert secret not in text and secret[3:20] not in text


# -- rate limits, in-process and in Redis -------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def limiter(request) -> dict:
    """Edge settings for each limiter. Redis must be there: a missing server fails, never skips."""
    return {"redis_url": REDIS} if request.param == "redis" else {}


async def test_responses_carry_openais_rate_limit_headers(registry, auth, limiter):
    key = await new_key(auth, requests_per_minute=10, tokens_per_minute=1000)
    async with edge_over_fake(engine(registry), registry, auth, **limiter) as url:
        async with aiohttp.ClientSession() as session:
            status, headers, _ = await post(session, url, key)
    assert status == 200
    assert headers["x-ratelimit-limit-requests"] == "10" and headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-limit-tokens"] == "1000" and int(headers["x-ratelimit-remaining-tokens"]) < 1000
    assert headers["x-ratelimit-reset-requests"].endswith("s")


async def test_requests_over_the_rpm_are_429_and_failed_requests_count(registry, auth, limiter):
    key = await new_key(auth, requests_per_minute=3)
    async with edge_over_fake(engine(registry), registry, auth, **limiter) as url:
        async with aiohttp.ClientSession() as session:
            assert (await post(session, url, key, {**CHAT, "temperature": 9}))[0] == 400  # counts
            assert (await post(session, url, key, {**CHAT, "model": "nope"}))[0] == 404  # counts
            assert (await post(session, url, key))[0] == 200
            status, headers, raw = await post(session, url, key)
    error = json.loads(raw)["error"]
    assert status == 429 and error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "Limit 3" in error["message"] and "try again in" in error["message"]
    assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) >= 1000
    assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_tokens_per_minute_reserve_at_admission_and_refuse_what_waiting_cannot_cure(registry, auth, limiter):
    key = await new_key(auth, tokens_per_minute=150)
    async with edge_over_fake(engine(registry, delay_s=0.3), registry, auth, **limiter) as url:
        async with aiohttp.ClientSession() as session:
            status, headers, raw = await post(session, url, key, {**CHAT, "max_tokens": 500})
            assert status == 429 and headers["x-should-retry"] == "false" and "Retry-After" not in headers
            assert json.loads(raw)["error"]["type"] == "tokens"
            first = asyncio.create_task(post(session, url, key, {**CHAT, "max_tokens": 100}))
            await asyncio.sleep(0.1)
            status, headers, raw = await post(session, url, key, {**CHAT, "max_tokens": 100})
            assert status == 429 and json.loads(raw)["error"]["type"] == "tokens" and int(headers["Retry-After"]) >= 1
            assert (await first)[0] == 200


async def test_concurrent_streams_are_limited_and_released(registry, auth, limiter):
    key = await new_key(auth, max_concurrent_streams=1)
    async with edge_over_fake(engine(registry, delay_s=0.3), registry, auth, **limiter) as url:
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(post(session, url, key))
            await asyncio.sleep(0.1)
            assert (await post(session, url, key))[0] == 429
            assert (await first)[0] == 200
            assert (await post(session, url, key))[0] == 200


async def test_a_model_the_key_may_not_use_is_403_and_not_retried(registry, auth):
    key = (await auth.store.create("acme", "t", Limits(allowed_models=("llama3-8b",))))[1]
    async with edge_over_fake(engine(registry), registry, auth) as url:
        async with aiohttp.ClientSession() as session:
            status, headers, raw = await post(session, url, key)
    assert status == 403 and headers["x-should-retry"] == "false"
    assert json.loads(raw)["error"]["code"] == "model_not_allowed"


async def test_waiting_out_retry_after_is_enough_and_the_sdk_does_it_too(registry, auth, limiter):
    """What the guide's stream_with_retry relies on (tests/e2e runs the guide's own loop): a 429
    names a wait after which the same stream is admitted; the SDK's own retries honour it too."""
    key = await new_key(auth, requests_per_minute=1)
    async with edge_over_fake(engine(registry), registry, auth, rate_window_s=2.0, **limiter) as url:
        plain = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        messages = [{"role": "user", "content": "Hello!"}]

        def stream() -> str:
            chunks = plain.chat.completions.create(model=MODEL, messages=messages, stream=True, max_tokens=10)
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)

        assert await asyncio.to_thread(stream)
        with pytest.raises(RateLimitError) as refused:
            await asyncio.to_thread(stream)
        wait = float(refused.value.response.headers["Retry-After"])
        assert 1 <= wait <= 5
        await asyncio.sleep(wait)
        assert await asyncio.to_thread(stream)
        # The SDK's own retries honour retry-after-ms: a default client just succeeds.
        default = OpenAI(base_url=f"{url}/v1", api_key=key)
        reply = await asyncio.to_thread(lambda: default.chat.completions.create(model=MODEL, messages=messages, max_tokens=3))
        assert reply.choices[0].message.content


async def test_two_edge_processes_sharing_redis_admit_exactly_the_limit(registry, auth, tmp_path):
    key = await new_key(auth, requests_per_minute=5)
    async with running_inference(inference_config(auth), engine=engine(registry), registry=registry) as inf:
        ports = free_ports(2)
        processes = []
        for port in ports:
            env = {**os.environ, "CLOUDACH_PORT": str(port), "CLOUDACH_INFERENCE_TARGET": inf.address,
                   "CLOUDACH_AUTH_TARGET": auth.address, "CLOUDACH_REDIS_URL": REDIS, "CLOUDACH_EDGE_METRICS_PORT": "0"}
            log = open(tmp_path / f"edge-{port}.log", "wb")
            processes.append(subprocess.Popen([sys.executable, "-m", "edge"], env=env, stdout=log, stderr=subprocess.STDOUT))
        try:
            for port, process in zip(ports, processes):
                await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/health", 30, process)
            async with aiohttp.ClientSession() as session:
                statuses = await asyncio.gather(*(
                    post(session, f"http://127.0.0.1:{ports[i % 2]}", key) for i in range(20)
                ))
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)
    codes = [s for s, _, _ in statuses]
    assert codes.count(200) == 5 and codes.count(429) == 15, codes


async def test_a_flood_of_unknown_keys_barely_reaches_auth_svc_and_valid_traffic_flows(registry, auth):
    import secrets

    from tests.integration.services import samples

    async def authenticate_calls(session) -> float:
        async with session.get(f"http://127.0.0.1:{auth.grpc.metrics_port}/metrics") as r:
            metrics = samples(await r.text())
        return sum(v for (name, labels), v in metrics.items()
                   if name == "cloudach_auth_rpc_requests_total" and ("method", "Authenticate") in labels)

    async with edge_over_fake(engine(registry), registry, auth, unknown_key_lookups_per_minute=10) as url:
        async with aiohttp.ClientSession() as session:
            async def ask(key: str) -> int:
                async with session.post(f"{url}/v1/chat/completions", json=CHAT,
                                        headers={"Authorization": f"Bearer {key}"}) as r:
                    await r.read()
                    return r.status

            assert await ask(API_KEY) == 200  # cached from here on
            before = await authenticate_calls(session)
            mistyped = ["ck-" + secrets.token_urlsafe(40)[:49] for _ in range(100)]  # the checksummed shape
            random_old = ["ck-" + secrets.token_urlsafe(32) for _ in range(100)]   # the older shape
            statuses = await asyncio.gather(*(ask(k) for k in mistyped + random_old),
                                            *(ask(API_KEY) for _ in range(20)))
            after = await authenticate_calls(session)
    bad, valid = statuses[:200], statuses[200:]
    assert valid == [200] * 20
    assert set(bad[:100]) == {401}  # refused by their checksum, with no lookup
    assert set(bad[100:]) == {401, 429} and bad[100:].count(401) <= 11
    assert after - before <= 11  # the address's budget of unknown-key lookups, not 200


async def test_a_redis_outage_falls_back_to_local_limits_and_shared_ones_return(registry, auth, tmp_path):
    """A Redis of the test's own, stopped mid-load: the limit holds (each of 2 replicas enforcing
    half of it), requests stay fast, /ready says which limits are in force; restarted, shared again."""
    import time

    (port,) = free_ports(1)

    def start_redis() -> subprocess.Popen:
        process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                return process
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    key = await new_key(auth, requests_per_minute=6)
    redis_server = start_redis()
    try:
        async with edge_over_fake(engine(registry), registry, auth, redis_url=f"redis://127.0.0.1:{port}/0",
                                  edge_replicas=2, redis_retry_s=1.0, redis_timeout_s=0.2) as url:
            async with aiohttp.ClientSession() as session:
                async def ready() -> str:
                    async with session.get(f"{url}/ready") as r:
                        return (await r.json())["rate_limits"]

                shared = [(await post(session, url, key))[0] for _ in range(2)]
                assert shared == [200, 200] and await ready() == "shared"
                redis_server.terminate()
                redis_server.wait(10)
                started = time.monotonic()
                local = [(await post(session, url, key))[0] for _ in range(8)]
                took = time.monotonic() - started
                assert await ready() == "local"
                # 6 a minute over 2 replicas: this one admits 3 on its own, never unlimited
                assert local.count(200) == 3 and local.count(429) == 5, local
                assert took < 5, f"8 requests took {took:.1f}s with Redis down"
                redis_server = start_redis()
                await asyncio.sleep(1.2)  # past redis_retry_s: Redis is tried again
                again = (await post(session, url, key))[0]
                assert again == 200 and await ready() == "shared"  # a fresh Redis: its buckets are full
    finally:
        redis_server.terminate()
        redis_server.wait(10)
