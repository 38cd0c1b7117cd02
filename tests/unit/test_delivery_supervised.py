"""The usage deliverer never stops for an error, sets poison records aside, and its depth gauge
keeps ticking on its own (real SQLite outbox; billing_svc's stub replaced by a fake)."""

from __future__ import annotations

import asyncio
import sqlite3

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from cloudach.billing.v1 import billing_pb2 as pb
from cloudach.outbox import MAX_ATTEMPTS, UsageOutbox, deliver_forever, delivering, watch_depth


class Identity:
    async def metadata(self):
        return (("authorization", "Bearer t"),)

    def renew(self) -> None:
        pass


class RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


class Billing:
    """RecordUsage that fails as told: a plain exception once, then INTERNAL for one request id."""

    def __init__(self, poison: str = "") -> None:
        self.recorded: list[str] = []
        self.crashed = False
        self.poison = poison
        self.poison_tries = 0
        self.tries_seen: dict[str, int] = {}  # request id: poison tries when it was recorded

    async def RecordUsage(self, request, metadata=None, timeout=None):
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("a bug in the channel")
        if request.record.request_id == self.poison:
            self.poison_tries += 1
            raise RpcError(grpc.StatusCode.INTERNAL)
        self.recorded.append(request.record.request_id)
        self.tries_seen[request.record.request_id] = self.poison_tries


def record(request_id: str) -> pb.UsageRecord:
    return pb.UsageRecord(request_id=request_id, key_id="k", organization="o", model="m")


async def until(check, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.02)


async def test_errors_poison_and_corrupt_rows_do_not_stop_delivery(tmp_path):
    path = tmp_path / "outbox.db"
    outbox = UsageOutbox(str(path))
    await outbox.open()
    for request_id in ("a", "poison", "b"):
        await outbox.add(record(request_id))
    with sqlite3.connect(path) as conn:  # a corrupt row between them
        conn.execute("INSERT INTO outbox (request_id, record, created_at_ms) VALUES ('junk', x'ffffffff', 0)")
    billing = Billing(poison="poison")
    set_aside = Counter("set_aside", "", registry=CollectorRegistry())
    deliverer = asyncio.create_task(deliver_forever(outbox, billing, Identity(), asyncio.Event(), max_backoff_s=0.05,
                                                    set_aside_counter=set_aside))
    try:
        await until(lambda: billing.recorded == ["a", "b"])
        n = 0
        while set_aside._value.get() < 2:  # traffic goes on: the poison record fails while others get through
            n += 1
            await outbox.add(record(f"later-{n}"))
            await asyncio.sleep(0.05)
            assert n < 200, "the poison record was never set aside"
        assert not deliverer.done()
        with sqlite3.connect(path) as conn:
            kept = dict(conn.execute("SELECT request_id, attempts FROM outbox WHERE dead = 1").fetchall())
        assert set(kept) == {"poison", "junk"} and kept["poison"] == MAX_ATTEMPTS  # kept, never lost
        assert billing.tries_seen["b"] == 1  # delivered behind the poison record, not after its tries
    finally:
        deliverer.cancel()
        await asyncio.gather(deliverer, return_exceptions=True)
        await outbox.close()


class Broken(Billing):
    """billing_svc failing on everything (its database is down)."""

    async def RecordUsage(self, request, metadata=None, timeout=None):
        self.poison_tries += 1
        raise RpcError(grpc.StatusCode.INTERNAL)


async def test_an_outage_of_billing_sets_nothing_aside(tmp_path):
    outbox = UsageOutbox(str(tmp_path / "outbox.db"))
    await outbox.open()
    for request_id in ("a", "b", "c"):
        await outbox.add(record(request_id))
    billing = Broken()
    deliverer = asyncio.create_task(deliver_forever(outbox, billing, Identity(), asyncio.Event(), max_backoff_s=0.01))
    try:
        await until(lambda: billing.poison_tries > 3 * (MAX_ATTEMPTS + 5))  # far more rounds than tries allowed
        assert len(await outbox.pending(10)) == 3  # all still waiting, none set aside
    finally:
        deliverer.cancel()
        await asyncio.gather(deliverer, return_exceptions=True)
        await outbox.close()


async def test_the_depth_gauge_ticks_without_the_deliverer(tmp_path):
    outbox = UsageOutbox(str(tmp_path / "outbox.db"))
    await outbox.open()
    gauge = Gauge("depth", "", registry=CollectorRegistry())
    watcher = asyncio.create_task(watch_depth(outbox, gauge, every_s=0.02))
    try:
        await outbox.add(record("x"))
        await until(lambda: gauge._value.get() == 1)
        await outbox.add(record("y"))
        await until(lambda: gauge._value.get() == 2)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await outbox.close()


async def test_a_shutdown_gives_the_deliverer_its_flush_time_to_empty_the_outbox(tmp_path):
    billing = Billing()
    billing.crashed = True  # no first failure: the flush alone must deliver
    gauge, counter = Gauge("d", "d", registry=CollectorRegistry()), Counter("s", "s", registry=CollectorRegistry())
    async with delivering(str(tmp_path / "o.db"), billing, Identity(), 1.0, 5.0, gauge, counter, flush_s=5.0) as (
            outbox, _wake):
        await outbox.add(record("last-words"))  # the deliverer is not woken: only the flush sends it
    assert billing.recorded == ["last-words"]


async def test_the_flush_cuts_a_long_backoff_short(tmp_path):
    """After an outage the deliverer sleeps ever longer between tries: the shutdown's flush (2 s
    here) does not wait out a 3.2 s backoff."""

    class Outage:
        def __init__(self) -> None:
            self.failures, self.recorded = 0, []

        async def RecordUsage(self, request, metadata=None, timeout=None):
            if self.failures < 5:
                self.failures += 1
                raise RpcError(grpc.StatusCode.UNAVAILABLE)
            self.recorded.append(request.record.request_id)

    billing = Outage()
    gauge, counter = Gauge("d", "d", registry=CollectorRegistry()), Counter("s", "s", registry=CollectorRegistry())
    async with delivering(str(tmp_path / "o.db"), billing, Identity(), 30.0, 5.0, gauge, counter, flush_s=2.0) as (
            outbox, wake):
        await outbox.add(record("after-an-outage"))
        wake.set()
        await until(lambda: billing.failures == 5)  # billing_svc is back; the deliverer sleeps 3.2 s
    assert billing.recorded == ["after-an-outage"]
