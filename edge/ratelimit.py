"""Per-key rate limits: requests per minute, tokens per minute, concurrent streams.

Each per-minute limit is a token bucket holding at most `limit` and refilled at limit/window
per second, so `remaining` and `reset` mean what OpenAI's x-ratelimit-* headers say: what is
left now, and how long until the bucket is full again. A request reserves its tokens (prompt
estimate plus the completion it may produce) at admission and settles to its real usage at the
end; its request is never refunded, failed or not. The in-process limiter serves one edge; the
Redis one (ratelimit_redis.py) makes several edges share one limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from edge.errors import ApiError, retry_headers

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Quota:
    requests_per_minute: int  # 0: unlimited
    tokens_per_minute: int
    max_concurrent_streams: int


@dataclass(slots=True)
class Decision:
    allowed: bool
    #: which limit refused: "requests", "tokens" or "streams"
    refused_by: str | None = None
    retry_after_s: float = 0.0
    #: False when waiting cannot help (the request alone needs more than the whole limit)
    curable: bool = True
    #: (limit, remaining, seconds until full) for requests and for tokens, where limited
    requests: tuple[int, int, float] | None = None
    tokens: tuple[int, int, float] | None = None


class Limiter(Protocol):
    async def admit(self, key_id: str, quota: Quota, request_id: str, tokens: int, lease_s: float) -> Decision: ...

    async def settle(self, key_id: str, quota: Quota, reserved: int, used: int, request_id: str = "") -> None: ...

    async def release(self, key_id: str, request_id: str) -> None: ...


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    return f"{whole}s" if whole < 60 else f"{whole // 60}m{whole % 60}s"


def headers(decision: Decision) -> dict[str, str]:
    out = {}
    for kind, state in (("requests", decision.requests), ("tokens", decision.tokens)):
        if state is not None:
            limit, remaining, reset_s = state
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining))
            out[f"x-ratelimit-reset-{kind}"] = duration(reset_s)
    return out


def refusal(decision: Decision, quota: Quota) -> ApiError:
    """The 429 for a refused request, with the waits the official SDKs honour."""
    wait = max(decision.retry_after_s, 0.001)
    if decision.refused_by == "tokens":
        limit = quota.tokens_per_minute
        message = (f"Rate limit reached for tokens per min (TPM): Limit {limit}. "
                   + (f"Please try again in {duration(wait)}." if decision.curable else
                      "This request alone needs more tokens than the limit allows: reduce max_tokens or the prompt."))
        kind = "tokens"
    elif decision.refused_by == "streams":
        message = (f"Rate limit reached for concurrent requests: Limit {quota.max_concurrent_streams}. "
                   f"Please try again in {duration(wait)}.")
        kind = "requests"
    else:
        message = (f"Rate limit reached for requests per min (RPM): Limit {quota.requests_per_minute}. "
                   f"Please try again in {duration(wait)}.")
        kind = "requests"
    extra = retry_headers(wait) if decision.curable else {"x-should-retry": "false"}
    return ApiError(429, message, type=kind, code="rate_limit_exceeded", headers={**headers(decision), **extra})


def judge(requests_level: float | None, rpm: int, tokens_level: float | None, tpm: int, tokens: int,
          streams: int, max_streams: int, window_s: float) -> Decision:
    """Admit or refuse, given the buckets' levels after this request's own request was counted."""
    request_wait = 0.0 if requests_level is None or requests_level >= 0 else (1 - requests_level) * window_s / rpm
    if request_wait:
        return Decision(False, "requests", request_wait)
    if tokens_level is not None and tokens > tpm:
        return Decision(False, "tokens", 0.0, curable=False)
    if tokens_level is not None and tokens_level < tokens:
        wait = (tokens - tokens_level) * window_s / tpm
        if requests_level is not None:
            wait = max(wait, (1 - requests_level) * window_s / rpm)
        return Decision(False, "tokens", wait)
    if max_streams and streams >= max_streams:
        return Decision(False, "streams", 1.0)
    return Decision(True)


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float

    def refill(self, capacity: int, now: float, window_s: float) -> None:
        self.level = min(capacity, self.level + (now - self.at) * capacity / window_s)
        self.at = now


@dataclass
class InProcessLimiter:
    """One edge process's limits (the default). Buckets and leases live in this process only."""

    window_s: float = WINDOW_S
    clock: object = time.monotonic
    _buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)
    _leases: dict[str, dict[str, float]] = field(default_factory=dict)

    def _bucket(self, key_id: str, kind: str, capacity: int, now: float) -> _Bucket:
        bucket = self._buckets.setdefault((key_id, kind), _Bucket(float(capacity), now))
        bucket.refill(capacity, now, self.window_s)
        return bucket

    def _state(self, bucket: _Bucket | None, capacity: int) -> tuple[int, int, float] | None:
        if bucket is None:
            return None
        return capacity, math.floor(bucket.level), (capacity - bucket.level) * self.window_s / capacity

    async def admit(self, key_id: str, quota: Quota, request_id: str, tokens: int, lease_s: float) -> Decision:
        now = self.clock()
        rpm, tpm = quota.requests_per_minute, quota.tokens_per_minute
        requests = self._bucket(key_id, "requests", rpm, now) if rpm else None
        tokens_bucket = self._bucket(key_id, "tokens", tpm, now) if tpm else None
        leases = self._leases.setdefault(key_id, {})
        for rid in [r for r, until in leases.items() if until <= now]:
            del leases[rid]  # a lease outlived its request (a crash): it expires on its own
        if requests is not None:
            requests.level -= 1  # every request counts, refused or failed ones included
        verdict = judge(
            None if requests is None else requests.level, rpm,
            None if tokens_bucket is None else tokens_bucket.level, tpm, tokens,
            len(leases), quota.max_concurrent_streams, self.window_s,
        )
        if verdict.allowed:
            if tokens_bucket is not None:
                tokens_bucket.level -= tokens
            if quota.max_concurrent_streams:
                leases[request_id] = now + lease_s
        verdict.requests = self._state(requests, rpm)
        verdict.tokens = self._state(tokens_bucket, tpm)
        return verdict

    async def settle(self, key_id: str, quota: Quota, reserved: int, used: int, request_id: str = "") -> None:
        if quota.tokens_per_minute and reserved != used:
            bucket = self._bucket(key_id, "tokens", quota.tokens_per_minute, self.clock())
            bucket.level = min(quota.tokens_per_minute, bucket.level + reserved - used)

    async def release(self, key_id: str, request_id: str) -> None:
        self._leases.get(key_id, {}).pop(request_id, None)
