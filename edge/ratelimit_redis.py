"""Rate limits shared by every edge replica: the same buckets as edge.ratelimit, kept in Redis.

Each check is one Lua script, so it is atomic across replicas and costs one round trip; the
clock is Redis's own, so replicas' clocks do not matter. Buckets expire once full again, so
idle keys cost nothing. If Redis cannot be reached, admit() raises LimiterUnavailable and the
breaker in front of it (ratelimit_failover.py) limits locally; it never admits unlimited.
"""

from __future__ import annotations

import logging
import math

import redis.asyncio as redis

from edge.ratelimit import WINDOW_S, Decision, Quota

log = logging.getLogger(__name__)


class LimiterUnavailable(Exception):
    """Redis did not answer an admission in time."""


def redis_client(url: str, timeout_s: float) -> redis.Redis:
    """A client that fails within timeout_s and does not retry: an outage must cost a request
    milliseconds, not the client's own retries and backoff (seconds)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 0), retry_on_timeout=False)

# The rules of edge.ratelimit.judge, in Lua. KEYS: requests bucket, tokens bucket, leases.
_ADMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local rpm, tpm, need, max_streams = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_ms, window = tonumber(ARGV[6]), tonumber(ARGV[7])
local function level_of(key, cap)
  local v = redis.call('HMGET', key, 'level', 'at')
  local level, at = tonumber(v[1]), tonumber(v[2])
  if level == nil then return cap end
  return math.min(cap, level + (now - at) * cap / window)
end
local function store(key, level, cap)
  redis.call('HSET', key, 'level', level, 'at', now)
  redis.call('PEXPIRE', key, math.ceil((cap - level) * window / cap) + 1000)
end
local rl, tl = nil, nil
if rpm > 0 then rl = level_of(KEYS[1], rpm) - 1 end
if tpm > 0 then tl = level_of(KEYS[2], tpm) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local streams = redis.call('ZCARD', KEYS[3])
local verdict, wait, curable = 'ok', 0, 1
if rl ~= nil and rl < 0 then
  verdict = 'requests'; wait = (1 - rl) * window / rpm
elseif tl ~= nil and need > tpm then
  verdict = 'tokens'; curable = 0
elseif tl ~= nil and tl < need then
  verdict = 'tokens'; wait = (need - tl) * window / tpm
  if rl ~= nil then wait = math.max(wait, (1 - rl) * window / rpm) end
elseif max_streams > 0 and streams >= max_streams then
  verdict = 'streams'; wait = 1000
end
if verdict == 'ok' then
  if tl ~= nil then tl = tl - need end
  if max_streams > 0 then
    redis.call('ZADD', KEYS[3], now + lease_ms, ARGV[5])
    redis.call('PEXPIRE', KEYS[3], lease_ms)
  end
end
if rl ~= nil then store(KEYS[1], rl, rpm) end
if tl ~= nil then store(KEYS[2], tl, tpm) end
return {verdict, tostring(wait), curable, tostring(rl or ''), tostring(tl or '')}
"""

_SETTLE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local cap, delta, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = cap
if v[1] then level = math.min(cap, tonumber(v[1]) + (now - tonumber(v[2])) * cap / window) end
level = math.min(cap, level + delta)
redis.call('HSET', KEYS[1], 'level', level, 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - level) * window / cap) + 1000)
return tostring(level)
"""


def _keys(key_id: str) -> list[str]:
    tag = f"cloudach:rl:{{{key_id}}}"  # one hash slot per key, for Redis Cluster
    return [f"{tag}:requests", f"{tag}:tokens", f"{tag}:leases"]


class RedisLimiter:
    def __init__(self, client: redis.Redis, window_s: float = WINDOW_S) -> None:
        self._client = client
        self._window_ms = int(window_s * 1000)
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)

    def _state(self, level: str, capacity: int) -> tuple[int, int, float] | None:
        if not level or not capacity:
            return None
        value = float(level)
        return capacity, math.floor(value), (capacity - value) * self._window_ms / capacity / 1000

    async def admit(self, key_id: str, quota: Quota, request_id: str, tokens: int, lease_s: float) -> Decision:
        try:
            verdict, wait_ms, curable, requests, tokens_level = await self._admit(
                keys=_keys(key_id),
                args=[quota.requests_per_minute, quota.tokens_per_minute, tokens, quota.max_concurrent_streams,
                      request_id, int(lease_s * 1000), self._window_ms],
            )
        except redis.RedisError as error:
            raise LimiterUnavailable(str(error)) from error
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        as_str = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        return Decision(
            allowed=verdict == "ok",
            refused_by=None if verdict == "ok" else verdict,
            retry_after_s=float(as_str(wait_ms)) / 1000,
            curable=bool(int(curable)),
            requests=self._state(as_str(requests), quota.requests_per_minute),
            tokens=self._state(as_str(tokens_level), quota.tokens_per_minute),
        )

    async def settle(self, key_id: str, quota: Quota, reserved: int, used: int, request_id: str = "") -> None:
        if not quota.tokens_per_minute or reserved == used:
            return
        try:
            await self._settle(keys=_keys(key_id)[1:2], args=[quota.tokens_per_minute, reserved - used, self._window_ms])
        except redis.RedisError as error:
            log.error("rate limiter unreachable, could not settle key %s: %s", key_id, error)

    async def release(self, key_id: str, request_id: str) -> None:
        try:
            await self._client.zrem(_keys(key_id)[2], request_id)
        except redis.RedisError as error:
            log.error("rate limiter unreachable, lease %s expires on its own: %s", request_id, error)
