"""Spend budgets, enforced at admission: per key and per organization, per UTC day and calendar
month, in micro-units of the billing currency.

A request holds its most possible cost (its token reservation at the model's prices: the prompt
estimate at the input price, every choice's max_tokens at the output price) against each budget
that applies, admitted only if every one has room for it on top of the spend so far and the holds
of requests still running; at the end the hold becomes the request's real cost under billing's
pricing policy (cloudach.prices: cached tokens at their rate, a failure of ours free, a batch's at
its discount). Requests admitted together overshoot a budget by no more than their holds
underestimate them: the prompt is estimated (4 characters a token; a default system prompt the
edge does not see), the output is counted at its max_tokens (or the default reservation).

Spend is counted in nano-units (integer) in counters per budget and period: in Redis when the edge
has one (every replica shares them, as it shares the rate limits), else in this process. A counter
starts from the spend billing_svc has recorded for its period (GetUsage), so a restart of the edge
or of Redis forgets nothing already billed; while billing_svc cannot say, a budgeted request
whose counter has no start yet is refused (503), never let through uncounted. A hold is settled
in the store that took it, and a settlement adjusts only a counter that exists (one Redis lost,
or a period ended, meanwhile: nothing to correct). Counters of a key and of its organization
share one Redis Cluster hash slot (the organization's).
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as redis
from google.protobuf.timestamp_pb2 import Timestamp

from cloudach.billing.v1 import billing_pb2 as bpb
from cloudach.prices import Price, PriceList, cost_picos
from edge.auth import Principal
from edge.errors import ApiError

log = logging.getLogger(__name__)

NANOS_PER_MICRO = 1_000
_INSUFFICIENT = ("You exceeded your current quota, please check your plan and billing details. This {scope}'s "
                 "{period} budget of {limit} {currency} is spent.")


def insufficient_quota(scope: str, period: str, limit_micros: int, currency: str) -> ApiError:
    """OpenAI's answer to a spent budget: 429 insufficient_quota, and no retry (waiting won't help)."""
    return ApiError(429, _INSUFFICIENT.format(scope=scope, period=period, limit=f"{limit_micros / 1e6:.6f}",
                                              currency=currency),
                    type="insufficient_quota", code="insufficient_quota", headers={"x-should-retry": "false"})


def cost_nanos(price: Price, prompt: int, completion: int, cached: int = 0, up: bool = False) -> int:
    picos = cost_picos(prompt, completion, price, cached)
    return -(-picos // 1_000) if up else picos // 1_000


@dataclass(frozen=True, slots=True)
class Counter:
    """One budget's spend in one period: its shared name, limit and where billing counts it."""

    name: str
    limit_nanos: int
    scope: str  # "key" or "organization"
    scope_id: str
    period: str  # "daily" or "monthly"
    start: datetime.datetime
    end: datetime.datetime

    @property
    def ttl_s(self) -> int:
        return max(1, int((self.end - datetime.datetime.now(datetime.UTC)).total_seconds()) + 3_600)


def _periods(now: datetime.datetime) -> dict[str, tuple[str, datetime.datetime, datetime.datetime]]:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = (month + datetime.timedelta(days=32)).replace(day=1)
    return {"daily": (day.strftime("%Y-%m-%d"), day, day + datetime.timedelta(days=1)),
            "monthly": (month.strftime("%Y-%m"), month, next_month)}


def counters(principal: Principal, now: datetime.datetime | None = None) -> list[Counter]:
    """The budgets that apply to principal's requests now (none set: none)."""
    now = now or datetime.datetime.now(datetime.UTC)
    periods = _periods(now)
    found = []
    for scope, scope_id, daily, monthly in (
        ("key", principal.key_id, principal.budget_daily_micros, principal.budget_monthly_micros),
        ("organization", principal.organization, principal.org_budget_daily_micros, principal.org_budget_monthly_micros),
    ):
        for period, limit in (("daily", daily), ("monthly", monthly)):
            if limit > 0:
                stamp, start, end = periods[period]
                name = f"cloudach:spend:{{{principal.organization}}}:{scope}:{scope_id}:{period}:{stamp}"
                found.append(Counter(name, limit * NANOS_PER_MICRO, scope, scope_id, period, start, end))
    return found


class Missing(Exception):
    """A counter has no value yet: it must be seeded from the ledger first."""

    def __init__(self, counter: Counter) -> None:
        super().__init__(counter.name)
        self.counter = counter


class SpendStore(Protocol):
    async def hold(self, counters: list[Counter], nanos: int) -> tuple[Counter | None, SpendStore]:
        """Adds nanos to every counter if each stays within its limit (else: the one that would
        not, and nothing changes), and the store that holds them now. Raises Missing for a
        counter never seeded."""

    async def seed(self, counter: Counter, nanos: int) -> None:
        """Sets a counter's starting spend unless it has one."""

    async def add(self, counters: list[Counter], nanos: int) -> None:
        """Adds nanos (negative: takes them) to those of the counters that exist."""


@dataclass
class InProcessSpend:
    """This process's counters (the default without Redis), forgotten at their period's end."""

    _values: dict[str, tuple[int, float]] = field(default_factory=dict)  # name: (nanos, expires at)

    def _get(self, counter: Counter) -> int | None:
        value = self._values.get(counter.name)
        if value is None or value[1] < time.time():
            return None
        return value[0]

    async def hold(self, counters: list[Counter], nanos: int) -> tuple[Counter | None, SpendStore]:
        spent = []
        for counter in counters:
            value = self._get(counter)
            if value is None:
                raise Missing(counter)
            spent.append(value)
        for counter, value in zip(counters, spent):
            if value + nanos > counter.limit_nanos:
                return counter, self
        await self.add(counters, nanos)
        return None, self

    async def seed(self, counter: Counter, nanos: int) -> None:
        if self._get(counter) is None:
            self._values[counter.name] = (nanos, time.time() + counter.ttl_s)

    async def add(self, counters: list[Counter], nanos: int) -> None:
        for counter in counters:
            if (value := self._get(counter)) is not None:
                self._values[counter.name] = (value + nanos, self._values[counter.name][1])
        if len(self._values) > 100_000:  # bounded: drop what has expired
            now = time.time()
            self._values = {k: v for k, v in self._values.items() if v[1] >= now}


# KEYS: the counters; ARGV: nanos, then each counter's limit. Atomic across replicas.
_HOLD = """
local nanos = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if not value then return {'missing', i} end
  if tonumber(value) + nanos > tonumber(ARGV[i + 1]) then return {'over', i} end
end
for i, key in ipairs(KEYS) do redis.call('INCRBY', key, nanos) end
return {'ok', 0}
"""
# KEYS: the counters; ARGV: nanos. Only counters that exist change (their TTL stays).
_ADD = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[1]) end
end
return 0
"""


class RedisSpend:
    """Counters every edge replica shares (one Lua script per hold: atomic, one round trip)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._hold = client.register_script(_HOLD)
        self._add = client.register_script(_ADD)

    async def hold(self, counters: list[Counter], nanos: int) -> tuple[Counter | None, SpendStore]:
        verdict, index = await self._hold(keys=[c.name for c in counters],
                                          args=[nanos, *(c.limit_nanos for c in counters)])
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict == "missing":
            raise Missing(counters[int(index) - 1])
        return (counters[int(index) - 1] if verdict == "over" else None), self

    async def seed(self, counter: Counter, nanos: int) -> None:
        await self._client.set(counter.name, nanos, nx=True, ex=counter.ttl_s)

    async def add(self, counters: list[Counter], nanos: int) -> None:
        await self._add(keys=[c.name for c in counters], args=[nanos])


class FailoverSpend:
    """Redis's counters while it answers; this process's (seeded from the ledger) while it does not."""

    def __init__(self, shared: RedisSpend, local: InProcessSpend) -> None:
        self._shared, self._local = shared, local

    async def _either(self, method: str, *args):
        try:
            return await getattr(self._shared, method)(*args)
        except redis.RedisError as error:
            log.warning("budget counters in Redis unreachable, counting in this process: %s", error)
            return await getattr(self._local, method)(*args)

    async def hold(self, counters: list[Counter], nanos: int) -> tuple[Counter | None, SpendStore]:
        return await self._either("hold", counters, nanos)

    async def seed(self, counter: Counter, nanos: int) -> None:
        await self._either("seed", counter, nanos)

    async def add(self, counters: list[Counter], nanos: int) -> None:
        await self._either("add", counters, nanos)


@dataclass(slots=True)
class Hold:
    counters: list[Counter]
    nanos: int
    #: the store that took it (Redis, or this process's while Redis was away): settled there
    store: SpendStore


class Budgets:
    """Holds and settles requests' spend against their key's and organization's budgets."""

    def __init__(self, store: SpendStore, prices: PriceList, billing) -> None:
        self._store, self._prices, self._billing = store, prices, billing

    async def _billed_so_far(self, principal: Principal, counter: Counter) -> int:
        """What billing_svc has recorded for the counter's scope and period, in nanos."""
        scope = {"key_id": counter.scope_id} if counter.scope == "key" else {"organization": counter.scope_id}
        query = bpb.GetUsageRequest(**scope, start_time=Timestamp(seconds=int(counter.start.timestamp())),
                                    end_time=Timestamp(seconds=int(counter.end.timestamp())))
        reply = await self._billing.GetUsage(query, metadata=principal.usage_metadata, timeout=5)
        return reply.total.cost_micros * NANOS_PER_MICRO

    async def hold(self, principal: Principal, model: str, prompt_tokens: int, output_tokens: int,
                   batch: bool = False) -> Hold | None:
        """Holds the request's most possible cost, or raises insufficient_quota. None: no budget applies."""
        applying = counters(principal)
        if not applying:
            return None
        nanos = cost_nanos(self._prices.billed(model, "completed", batch), prompt_tokens, output_tokens, up=True)
        for _ in range(len(applying) + 1):
            try:
                over, store = await self._store.hold(applying, nanos)
                break
            except Missing as missing:
                await self._store.seed(missing.counter, await self._billed_so_far(principal, missing.counter))
        else:
            raise RuntimeError("budget counters could not be seeded")
        if over is not None:
            raise insufficient_quota(over.scope, over.period, over.limit_nanos // NANOS_PER_MICRO, self._prices.currency)
        return Hold(applying, nanos, store)

    async def settle(self, hold: Hold | None, model: str, outcome: str, prompt: int, completion: int,
                     cached: int, batch: bool = False) -> None:
        """The hold becomes the request's cost as billing prices it."""
        if hold is None:
            return
        actual = cost_nanos(self._prices.billed(model, outcome, batch), prompt, completion, cached)
        if actual != hold.nanos:
            try:
                await hold.store.add(hold.counters, actual - hold.nanos)
            except Exception:  # noqa: BLE001 - a settlement lost to an outage: the hold stays (over-counts, never under)
                log.exception("could not settle a budget hold")
