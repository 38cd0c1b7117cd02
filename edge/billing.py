"""Usage records leave the edge through a durable outbox, off the response path.

Each request that reached inference is written to a local SQLite outbox (WAL, synchronous
writes) as it ends, whatever the outcome. A background task delivers records to billing_svc,
oldest first, deleting each once acknowledged; RecordUsage is idempotent by request id, so a
record delivered twice (the edge died between delivery and deletion) is still counted once.
While billing_svc is unreachable, records wait with exponential backoff, across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import sqlite3
import time

import grpc
from opentelemetry import propagate, trace

from cloudach.auth.v1 import auth_pb2
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.billing.v1 import billing_pb2 as pb
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.db import Database
from cloudach.errors import InvalidArgument
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
tracer = trace.get_tracer("cloudach.edge")


def queued_records(path: pathlib.Path) -> int | None:
    """How many records the outbox at path holds, read without opening it for writing (for
    `cloudach status`); None when there is no outbox there yet."""
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(_COUNT).fetchone()[0]


class UsageOutbox:
    def __init__(self, path: str) -> None:
        self._db = Database(f"sqlite:///{path}")

    async def open(self) -> None:
        await self._db.migrate("edge_outbox", MIGRATIONS)

    async def add(self, record: pb.UsageRecord, traceparent: str = "") -> None:
        await self._db.execute(
            "INSERT INTO outbox (request_id, record, created_at_ms, traceparent) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (request_id) DO NOTHING",
            (record.request_id, record.SerializeToString(), int(time.time() * 1000), traceparent),
        )

    async def pending(self, limit: int) -> list[tuple[int, pb.UsageRecord, str]]:
        rows = await self._db.fetchall(
            "SELECT id, record, traceparent FROM outbox WHERE dead = 0 ORDER BY id LIMIT ?", (limit,))
        return [(row_id, pb.UsageRecord.FromString(blob), traceparent) for row_id, blob, traceparent in rows]

    async def delivered(self, row_id: int) -> None:
        await self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    async def set_aside(self, row_id: int) -> None:
        """A record billing_svc refuses as invalid: kept (never lost) but no longer retried."""
        await self._db.execute("UPDATE outbox SET dead = 1, attempts = attempts + 1 WHERE id = ?", (row_id,))

    async def depth(self) -> int:
        row = await self._db.fetchone(_COUNT)
        return int(row[0])

    async def close(self) -> None:
        await self._db.close()


class ServiceToken:
    """The edge's own internal token, from its service key, renewed a minute before it expires."""

    def __init__(self, auth: AuthServiceStub, key: str) -> None:
        self._auth = auth
        self._key = key
        self._token = ""
        self._renew_at = 0.0

    async def metadata(self) -> tuple[tuple[str, str], ...]:
        if time.time() >= self._renew_at:
            reply = await self._auth.Authenticate(auth_pb2.AuthenticateRequest(api_key=self._key), timeout=5)
            self._token = reply.token
            self._renew_at = reply.token_expires_at.seconds - 60
        return (("authorization", f"Bearer {self._token}"),)


async def _deliver(outbox: UsageOutbox, billing: BillingServiceStub, metadata: tuple[tuple[str, str], ...],
                   records: list[tuple[int, pb.UsageRecord, str]]) -> None:
    """Delivers records in order, deleting each once billing_svc has it; one it refuses as
    invalid is set aside. Any other failure propagates, and the rest wait for the next attempt."""
    for row_id, record, traceparent in records:
        parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
        try:
            with tracer.start_as_current_span("usage delivery", context=parent,
                                              attributes={"cloudach.request_id": record.request_id}):
                await billing.RecordUsage(pb.RecordUsageRequest(record=record), metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError as error:
            if not isinstance(error_from_rpc(error), InvalidArgument):
                raise
            log.error("billing_svc refused usage record %s: %s", record.request_id, error.details())
            await outbox.set_aside(row_id)
            continue
        await outbox.delivered(row_id)


async def deliver_forever(outbox: UsageOutbox, billing: BillingServiceStub, identity: ServiceToken | None,
                          wake: asyncio.Event, max_backoff_s: float = 30.0, batch: int = 100,
                          depth_gauge=None) -> None:
    """Delivers the outbox until cancelled; keeps depth_gauge (a Prometheus gauge) current.

    Without an identity (no service key) records are kept and nothing is delivered."""
    if identity is None:
        log.warning("usage records are kept in the outbox, not delivered: no service key (CLOUDACH_EDGE_SERVICE_KEY_FILE)")
    backoff = 0.2
    while True:
        if depth_gauge is not None:
            depth_gauge.set(await outbox.depth())
        records = await outbox.pending(batch) if identity is not None else []
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
            await _deliver(outbox, billing, await identity.metadata(), records)
            backoff = 0.2
        except grpc.aio.AioRpcError as error:
            log.warning("usage delivery paused %.1fs: %s", backoff, error_from_rpc(error).message)
            await asyncio.sleep(backoff)
            backoff = min(max_backoff_s, backoff * 2)
