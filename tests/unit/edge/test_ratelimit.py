"""Rate-limit arithmetic: token buckets, OpenAI's headers and its 429."""

from __future__ import annotations

import json

from edge.ratelimit import Decision, InProcessLimiter, Quota, duration, headers, judge, refusal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_durations_read_as_openais_reset_headers():
    assert [duration(s) for s in (0.0201, 0.5, 1, 59.2, 60, 360)] == ["21ms", "500ms", "1s", "1m0s", "1m0s", "6m0s"]


def test_judge_refuses_by_the_first_limit_reached_and_says_how_long_to_wait():
    assert judge(None, 0, None, 0, 10, 0, 0, 60).allowed
    by_requests = judge(-0.5, 60, None, 0, 10, 0, 0, 60)
    assert (by_requests.refused_by, by_requests.retry_after_s) == ("requests", 1.5)
    by_tokens = judge(5, 60, 100, 600, 160, 0, 0, 60)
    assert (by_tokens.refused_by, by_tokens.retry_after_s, by_tokens.curable) == ("tokens", 6.0, True)
    too_big = judge(None, 0, 600, 600, 601, 0, 0, 60)
    assert (too_big.refused_by, too_big.curable) == ("tokens", False)
    assert judge(None, 0, None, 0, 1, 2, 2, 60).refused_by == "streams"


async def test_buckets_refill_over_the_window_and_settle_to_real_usage():
    clock = Clock()
    limiter = InProcessLimiter(window_s=60, clock=clock)
    quota = Quota(requests_per_minute=2, tokens_per_minute=600, max_concurrent_streams=1)
    first = await limiter.admit("k", quota, "r1", 300, lease_s=60)
    assert first.allowed and first.requests == (2, 1, 30.0) and first.tokens == (600, 300, 30.0)
    assert (await limiter.admit("k", quota, "r2", 10, lease_s=60)).refused_by == "streams"
    await limiter.settle("k", quota, reserved=300, used=100)  # the request used less than it held
    await limiter.release("k", "r1")
    clock.now += 30  # half a window: one request and 300 tokens back
    again = await limiter.admit("k", quota, "r3", 10, lease_s=60)
    assert again.allowed
    assert again.requests == (2, 0, 60.0)  # the refused request counted too, as OpenAI counts it
    assert again.tokens == (600, 590, 1.0)  # 500 after settling, capped at 600 by the refill, minus 10


def test_a_429_carries_openais_message_headers_and_retry_wait():
    decision = Decision(False, "tokens", 1.5, requests=(60, 59, 1.0), tokens=(600, 0, 60.0))
    error = refusal(decision, Quota(60, 600, 0))
    body = json.loads(error.body())["error"]
    assert error.status == 429 and body["code"] == "rate_limit_exceeded" and body["type"] == "tokens"
    assert body["message"].startswith("Rate limit reached for tokens per min (TPM): Limit 600.")
    assert error.headers["Retry-After"] == "2" and error.headers["retry-after-ms"] == "1500"
    assert error.headers["x-ratelimit-remaining-tokens"] == "0" and error.headers["x-ratelimit-reset-tokens"] == "1m0s"
    hopeless = refusal(Decision(False, "tokens", 0.0, curable=False), Quota(0, 600, 0))
    assert hopeless.headers == {"x-should-retry": "false"}


def test_headers_name_only_the_limits_that_apply():
    assert headers(Decision(True)) == {}
    assert set(headers(Decision(True, requests=(10, 9, 6.0)))) == {
        "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}


async def test_workers_without_redis_each_enforce_their_share_so_together_they_keep_the_limit():
    from edge.ratelimit_failover import ShareLimiter

    quota = Quota(requests_per_minute=10, tokens_per_minute=0, max_concurrent_streams=4)
    workers = [ShareLimiter(InProcessLimiter(window_s=60, clock=Clock()), 2) for _ in range(2)]
    admitted = [sum([(await w.admit("k", quota, f"{i}-{n}", 0, lease_s=60)).allowed for n in range(4)])
                for i, w in enumerate(workers)]
    assert admitted == [2, 2]  # 4 streams in all across the two, as the key allows
    await workers[0].release("k", "0-0")
    assert (await workers[0].admit("k", quota, "0-9", 0, lease_s=60)).allowed  # its share frees up again
