"""Usage records leave a service through a durable outbox, off the response path.

The edge writes each request that reached inference to a local SQLite outbox (WAL, synchronous
writes) as it ends, whatever the outcome; inference_svc writes its own report of each generation
it ran for the edge (the backstop that bills a stream the edge's crash cut: billing_svc.ledger).
A background task delivers records to billing_svc, oldest first, deleting each once
acknowledged; RecordUsage is idempotent (by request id, a report by generation id), so a record
delivered twice (the sender died between delivery and deletion) is still counted once.
While billing_svc is unreachable, records wait with exponential backoff, across restarts. The
deliverer never stops for an error: whatever fails (the outbox's database, a token, a call) is
logged and retried after a backoff; a record that cannot be read, or that billing_svc keeps
failing on while it takes the others, is set aside (kept, counted, logged) after MAX_ATTEMPTS, and
the rest flow on. An outage of billing_svc (it fails on every record) sets nothing aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import sqlite3
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import propagate, trace

from cloudach.auth.v1 import auth_pb2
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.billing.v1 import billing_pb2 as pb
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.db import Database
from cloudach.errors import (DeadlineExceeded, InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated,
                             Unavailable)
from cloudach.rpc.errors import error_from_rpc

log = logging.getLogger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL UNIQUE,
        record BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        dead INTEGER NOT NULL DEFAULT 0,
        created_at_ms BIGINT NOT NULL
    )
    """,
    "ALTER TABLE outbox ADD COLUMN traceparent TEXT NOT NULL DEFAULT ''",
]
_COUNT = "SELECT COUNT(*) FROM outbox"
#: deliveries billing_svc answered with an error (not just unreachable) before a record is set aside
MAX_ATTEMPTS = 10
tracer = trace.get_tracer("cloudach.edge")


def queued_records(path: pathlib.Path) -> int | None:
    """How many records the outbox at path holds, read without opening it for writing (for
    `cloudach status`); None when there is no outbox there yet."""
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(_COUNT).fetchone()[0]


_INSERT = ("INSERT INTO outbox (request_id, record, created_at_ms, traceparent) VALUES (?, ?, ?, ?) "
           "ON CONFLICT (request_id) DO NOTHING")
#: records written in one transaction at most
MAX_GROUP = 256


class UsageOutbox:
    """The outbox's table. Records added while a write is under way are committed together in the
    next transaction (group commit): each add() still returns only once its record is durable."""

    def __init__(self, path: str) -> None:
        self._db = Database(f"sqlite:///{path}")
        self._queued: list[tuple[tuple, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def open(self) -> None:
        await self._db.migrate("edge_outbox", MIGRATIONS)

    async def add(self, record: pb.UsageRecord, traceparent: str = "") -> None:
        """Keeps the record until delivered; a second one with its id (a report's: its generation
        id) is ignored. Returns once the record is committed; raises if it could not be."""
        row = (record.generation_id or record.request_id, record.SerializeToString(), int(time.time() * 1000),
               traceparent)
        stored = asyncio.get_running_loop().create_future()
        self._queued.append((row, stored))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queued())
        await asyncio.shield(stored)  # a caller that leaves does not take its record's write with it

    async def _write_queued(self) -> None:
        try:
            while self._queued:
                group, self._queued = self._queued[:MAX_GROUP], self._queued[MAX_GROUP:]
                try:
                    await self._db.transaction([(_INSERT, row) for row, _ in group])
                    results = [None] * len(group)
                except Exception:  # noqa: BLE001 - one bad row must not fail the others: one at a time
                    results = [await self._insert_alone(row) for row, _ in group]
                for (_, stored), failure in zip(group, results):
                    if stored.done():
                        continue
                    if failure is None:
                        stored.set_result(None)
                    else:
                        stored.set_exception(failure)
        finally:
            self._writer = None

    async def _insert_alone(self, row: tuple) -> Exception | None:
        try:
            await self._db.execute(_INSERT, row)
        except Exception as failure:  # noqa: BLE001 - handed to the row's add()
            return failure
        return None

    async def pending(self, limit: int, on_set_aside=None) -> list[tuple[int, pb.UsageRecord, str]]:
        """The oldest records to deliver; a row that does not parse is set aside (on_set_aside is told)."""
        rows = await self._db.fetchall(
            "SELECT id, record, traceparent FROM outbox WHERE dead = 0 ORDER BY id LIMIT ?", (limit,))
        records = []
        for row_id, blob, traceparent in rows:
            try:
                records.append((row_id, pb.UsageRecord.FromString(blob), traceparent))
            except Exception:  # noqa: BLE001 - a corrupt row must not stop the ones behind it
                log.error("USAGE RECORD UNREADABLE: outbox row %d set aside", row_id)
                await self.set_aside(row_id)
                if on_set_aside is not None:
                    on_set_aside()
        return records

    async def failed(self, row_id: int) -> int:
        """One more delivery billing_svc answered with an error; returns the attempts so far."""
        await self._db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", (row_id,))
        row = await self._db.fetchone("SELECT attempts FROM outbox WHERE id = ?", (row_id,))
        return int(row[0]) if row else 0

    async def delivered(self, row_ids: list[int]) -> None:
        """Deletes the rows billing_svc has (one statement for a round's deliveries)."""
        for start in range(0, len(row_ids), 500):
            chunk = row_ids[start:start + 500]
            await self._db.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    async def set_aside(self, row_id: int) -> None:
        """A record billing_svc refuses as invalid: kept (never lost) but no longer retried."""
        await self._db.execute("UPDATE outbox SET dead = 1 WHERE id = ?", (row_id,))

    async def depth(self) -> int:
        row = await self._db.fetchone(_COUNT)
        return int(row[0])

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.shield(self._writer)
        await self._db.close()


class ServiceToken:
    """A service's own internal token, from its service key, renewed a minute before it expires."""

    def __init__(self, auth: AuthServiceStub, key: str, purpose: int = auth_pb2.PURPOSE_API) -> None:
        """purpose: PURPOSE_API (billing_svc's usage:write), or PURPOSE_ADMIN (auth_svc's tokens:issue)."""
        self._auth = auth
        self._key = key
        self._purpose = purpose
        self._token = ""
        self._renew_at = 0.0

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        if time.time() >= self._renew_at:
            reply = await self._auth.Authenticate(auth_pb2.AuthenticateRequest(api_key=self._key, purpose=self._purpose),
                                                  timeout=5)
            if reply.principal.role != auth_pb2.KEY_ROLE_SERVICE:
                # Its tokens could never record usage: say so, every round, instead of stalling quietly.
                raise PermissionDenied(f"the service key ({reply.principal.key_id}) is not a service key: create one "
                                       "with `cloudach keys create --role service` and point the service at it")
            self._token = reply.token
            self._renew_at = reply.token_expires_at.seconds - 60
        return (("authorization", f"Bearer {self._token}"),)

    def renew(self) -> None:
        """billing_svc refused the token (a key rotation, clocks apart): get a new one next time."""
        self._renew_at = 0.0


async def _deliver(outbox: UsageOutbox, billing: BillingServiceStub, identity: ServiceToken,
                   records: list[tuple[int, pb.UsageRecord, str]], on_set_aside=None) -> None:
    """Delivers records in order, deleting each once billing_svc has it. One it refuses as invalid
    is set aside. One it fails on is retried next round while the others go on, and counts a try
    only in a round where others got through (so it is the record, not billing_svc, that fails):
    after MAX_ATTEMPTS such tries it is set aside. billing_svc away, or refusing our token,
    propagates: every record waits, none is charged a try."""
    metadata = await identity.metadata()
    failed: list[tuple[int, pb.UsageRecord, str]] = []
    delivered: list[int] = []
    try:
        for row_id, record, traceparent in records:
            parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
            try:
                with tracer.start_as_current_span("usage delivery", context=parent,
                                                  attributes={"cloudach.request_id": record.request_id}):
                    await billing.RecordUsage(pb.RecordUsageRequest(record=record), metadata=metadata, timeout=5)
            except grpc.aio.AioRpcError as error:
                failure = error_from_rpc(error)
                if isinstance(failure, (Unauthenticated, PermissionDenied)):
                    identity.renew()
                    raise
                if isinstance(failure, (Unavailable, DeadlineExceeded, ResourceExhausted)):
                    raise  # billing_svc is away or busy: every record waits
                if isinstance(failure, InvalidArgument):
                    await _set_aside(outbox, row_id, record, failure.message, on_set_aside)
                else:
                    failed.append((row_id, record, failure.message))
                continue
            delivered.append(row_id)
    finally:
        if delivered:  # whatever stopped the round: what billing_svc has leaves the outbox
            await outbox.delivered(delivered)
    if not failed:
        return
    if delivered:  # others got through: these records are what fails
        for row_id, record, reason in failed:
            if await outbox.failed(row_id) >= MAX_ATTEMPTS:
                await _set_aside(outbox, row_id, record, reason, on_set_aside)
    raise RuntimeError(f"billing_svc failed on {len(failed)} usage record(s): {failed[0][2]}; they are retried")


async def _set_aside(outbox: UsageOutbox, row_id: int, record: pb.UsageRecord, reason: str, on_set_aside) -> None:
    log.error("USAGE RECORD SET ASIDE: billing_svc refused %s: %s", record.request_id, reason)
    await outbox.set_aside(row_id)
    if on_set_aside is not None:
        on_set_aside()


async def watch_depth(outbox: UsageOutbox, gauge, every_s: float = 5.0) -> None:
    """Keeps the outbox-depth gauge current on its own timer, whatever the deliverer is doing."""
    while True:
        try:
            gauge.set(await outbox.depth())
        except Exception as error:  # noqa: BLE001 - a gauge must not die; the next tick retries
            log.warning("outbox depth unreadable: %s", error)
        await asyncio.sleep(every_s)


async def _pause(seconds: float, urgent: asyncio.Event | None) -> None:
    """A backoff, cut short once urgent is set (a shutdown's flush: then a tenth of a second)."""
    if urgent is None or urgent.is_set():
        await asyncio.sleep(seconds if urgent is None else min(seconds, 0.1))
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await urgent.wait()


async def deliver_forever(outbox: UsageOutbox, billing: BillingServiceStub, identity: ServiceToken | None,
                          wake: asyncio.Event, max_backoff_s: float = 30.0, batch: int = 100,
                          set_aside_counter=None, urgent: asyncio.Event | None = None) -> None:
    """Delivers the outbox until cancelled; any failure is logged and retried after a backoff.

    Without an identity (no service key) records are kept and nothing is delivered."""
    if identity is None:
        log.warning("usage records are kept in the outbox, not delivered: no service key configured")
    backoff = 0.2
    counted = set_aside_counter.inc if set_aside_counter is not None else None
    while True:
        try:
            records = await outbox.pending(batch, counted) if identity is not None else []
        except Exception as error:  # noqa: BLE001 - the outbox's database failed: retry, never stop
            log.error("usage outbox unreadable, retrying in %.1fs: %s", backoff, error)
            await _pause(backoff, urgent)
            backoff = min(max_backoff_s, backoff * 2)
            continue
        if not records:
            wake.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
            # lands as its inner wait ends, and this loop then outlived the edge's shutdown.
            try:
                async with asyncio.timeout(1.0):
                    await wake.wait()
            except TimeoutError:
                pass
            continue
        try:
            await _deliver(outbox, billing, identity, records, counted)
            backoff = 0.2
        except Exception as error:  # noqa: BLE001 - supervised: whatever failed, back off and retry
            reason = error_from_rpc(error).message if isinstance(error, grpc.aio.AioRpcError) else repr(error)
            log.warning("usage delivery paused %.1fs: %s", backoff, reason)
            await _pause(backoff, urgent)
            backoff = min(max_backoff_s, backoff * 2)


@contextlib.asynccontextmanager
async def delivering(path: str, billing: BillingServiceStub, identity: ServiceToken | None, max_backoff_s: float,
                     depth_every_s: float, depth_gauge, set_aside_counter,
                     flush_s: float = 0.0) -> AsyncIterator[tuple[UsageOutbox, asyncio.Event]]:
    """An open outbox at path, delivered to billing_svc while the block runs; yields it and the
    event that wakes the deliverer when a record is added. As the block ends the deliverer gets up
    to flush_s more to empty it (a pod about to be deleted takes its records with it otherwise);
    what is still not delivered stays in the outbox for the next start."""
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    outbox = UsageOutbox(path)
    await outbox.open()
    wake, urgent = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(deliver_forever(outbox, billing, identity, wake, max_backoff_s,
                                            set_aside_counter=set_aside_counter, urgent=urgent)),
        asyncio.create_task(watch_depth(outbox, depth_gauge, depth_every_s)),
    ]
    try:
        yield outbox, wake
    finally:
        deadline = time.monotonic() + flush_s
        urgent.set()  # no more backoff: every try counts now
        with contextlib.suppress(Exception):
            while identity is not None and time.monotonic() < deadline and await outbox.pending(1):
                wake.set()
                await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await outbox.close()
