"""Shared limits that survive a Redis outage: a circuit breaker in front of the Redis limiter.

While Redis answers, every replica shares its buckets. When a call fails or takes longer than
its short timeout, the breaker opens: for `open_s` this edge limits on its own, each key's limits
divided by the number of edge replicas (so the fleet together stays within them), then it tries
Redis again. Never unlimited. Each request settles and releases with the limiter that admitted it.
The mode ("shared" or "local") is a gauge and part of /ready's answer.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import redis.asyncio as redis

from edge.ratelimit import Decision, InProcessLimiter, Quota
from edge.ratelimit_redis import LimiterUnavailable

log = logging.getLogger(__name__)


def _share(quota: Quota, replicas: int) -> Quota:
    """One replica's part of a key's limits (at least 1 of each that is set)."""
    def part(limit: int) -> int:
        return max(1, limit // replicas) if limit else 0

    return Quota(part(quota.requests_per_minute), part(quota.tokens_per_minute), part(quota.max_concurrent_streams))


class ShareLimiter:
    """This process's part of every key's limits, where several edge processes each limit on their
    own without Redis (workers sharing one port: the kernel spreads connections among them), so
    that together they stay within the key's limits."""

    def __init__(self, local: InProcessLimiter, processes: int) -> None:
        self._local, self._processes = local, max(1, processes)

    async def admit(self, key_id: str, quota: Quota, request_id: str, tokens: int, lease_s: float) -> Decision:
        return await self._local.admit(key_id, _share(quota, self._processes), request_id, tokens, lease_s)

    async def settle(self, key_id: str, quota: Quota, reserved: int, used: int, request_id: str = "") -> None:
        await self._local.settle(key_id, _share(quota, self._processes), reserved, used, request_id)

    async def release(self, key_id: str, request_id: str) -> None:
        await self._local.release(key_id, request_id)


class FailoverLimiter:
    def __init__(self, shared, local: InProcessLimiter, replicas: int = 1, open_s: float = 10.0,
                 mode_gauge=None, clock=time.monotonic, max_tracked: int = 100_000) -> None:
        self._shared, self._local = shared, local
        self._replicas = max(1, replicas)
        self._open_s = open_s
        self._open_until = 0.0
        self._gauge = mode_gauge
        self._clock = clock
        #: request id -> whether the local limiter admitted it (so it settles there too)
        self._local_requests: OrderedDict[str, None] = OrderedDict()
        self._max_tracked = max_tracked
        self._set_mode("shared")

    @property
    def mode(self) -> str:
        return "local" if self._clock() < self._open_until else "shared"

    def _set_mode(self, mode: str) -> None:
        if self._gauge is not None:
            for name in ("shared", "local"):
                self._gauge.labels(name).set(1 if name == mode else 0)

    def _trip(self, error: BaseException) -> None:
        if self._clock() >= self._open_until:
            log.error("rate limiter: Redis unreachable (%s); limiting locally at 1/%d of each key's limits for %gs",
                      error, self._replicas, self._open_s)
        self._open_until = self._clock() + self._open_s
        self._set_mode("local")

    async def admit(self, key_id: str, quota: Quota, request_id: str, tokens: int, lease_s: float) -> Decision:
        if self.mode == "shared":
            try:
                decision = await self._shared.admit(key_id, quota, request_id, tokens, lease_s)
            except (LimiterUnavailable, redis.RedisError, OSError, TimeoutError) as error:
                self._trip(error)
            else:
                self._set_mode("shared")
                return decision
        decision = await self._local.admit(key_id, _share(quota, self._replicas), request_id, tokens, lease_s)
        if request_id:
            self._local_requests[request_id] = None
            while len(self._local_requests) > self._max_tracked:
                self._local_requests.popitem(last=False)
        return decision

    async def settle(self, key_id: str, quota: Quota, reserved: int, used: int, request_id: str = "") -> None:
        if request_id in self._local_requests:
            await self._local.settle(key_id, _share(quota, self._replicas), reserved, used, request_id)
        else:
            await self._shared.settle(key_id, quota, reserved, used, request_id)

    async def release(self, key_id: str, request_id: str) -> None:
        if request_id in self._local_requests:
            del self._local_requests[request_id]
            await self._local.release(key_id, request_id)
        else:
            await self._shared.release(key_id, request_id)
