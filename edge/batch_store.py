"""Files and batch jobs (OpenAI's Files and Batch APIs): their state in a database every edge
replica shares (SQLite by default, PostgreSQL in production), their bytes behind FileStore (a
directory here; object storage is one more implementation of its two methods).

A batch's requests are rows (batch_items), each done once its result is stored, so a restart of
any process resumes a batch where it was; the edge replica running a batch holds a lease on it
that it renews, and a lease left to expire (its edge died) lets another replica take it over.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

from cloudach.db import Database

MIGRATIONS = [
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        organization TEXT NOT NULL,
        key_id TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX files_organization ON files (organization, created_at);
    CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        organization TEXT NOT NULL,
        key_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        input_file_id TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        status TEXT NOT NULL,
        metadata TEXT NOT NULL,
        failures BIGINT NOT NULL,
        errors TEXT NOT NULL,
        output_file_id TEXT NOT NULL,
        error_file_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        in_progress_at BIGINT,
        finalizing_at BIGINT,
        completed_at BIGINT,
        failed_at BIGINT,
        expired_at BIGINT,
        cancelling_at BIGINT,
        cancelled_at BIGINT,
        lease_owner TEXT NOT NULL,
        lease_until_ms BIGINT NOT NULL
    );
    CREATE INDEX batches_organization ON batches (organization, created_at);
    CREATE INDEX batches_status ON batches (status);
    CREATE TABLE batch_items (
        batch_id TEXT NOT NULL,
        line BIGINT NOT NULL,
        custom_id TEXT NOT NULL,
        body TEXT NOT NULL,
        status TEXT NOT NULL,
        result TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        next_at_ms BIGINT NOT NULL,
        PRIMARY KEY (batch_id, line)
    )
    """,
]
#: the statuses a batch can still move on from (a runner works on them)
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_TIMES = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")
_BATCH_COLUMNS = ("id, organization, key_id, endpoint, input_file_id, completion_window, status, metadata, errors, "
                  "output_file_id, error_file_id, " + ", ".join(_TIMES))


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class FileStore(Protocol):
    """Where files' bytes live (the database keeps what they are)."""

    async def put(self, file_id: str, data: bytes) -> None: ...

    async def get(self, file_id: str) -> bytes: ...


class DirectoryFileStore:
    """Files on a local (or mounted, shared) disk, written whole then renamed into place."""

    def __init__(self, directory: str) -> None:
        self._dir = pathlib.Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)

    def _path(self, file_id: str) -> pathlib.Path:
        assert file_id.replace("-", "").isalnum(), file_id
        return self._dir / file_id

    def _write(self, file_id: str, data: bytes) -> None:
        partial = self._path(file_id).with_suffix(".partial")
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self._path(file_id))

    async def put(self, file_id: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, file_id, data)  # megabytes and an fsync: off the event loop

    async def get(self, file_id: str) -> bytes:
        return await asyncio.to_thread(self._path(file_id).read_bytes)


@dataclass(frozen=True)
class FileInfo:
    id: str
    organization: str
    key_id: str
    purpose: str
    filename: str
    bytes: int
    created_at: int

    def json(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


@dataclass(frozen=True)
class Batch:
    id: str
    organization: str
    key_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    metadata: dict
    errors: list
    output_file_id: str
    error_file_id: str
    times: dict[str, int | None]
    counts: dict[str, int]

    def json(self) -> dict:
        """OpenAI's Batch object."""
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file_id or None, "error_file_id": self.error_file_id or None,
            **self.times, "request_counts": self.counts, "metadata": self.metadata or None,
        }


@dataclass(frozen=True)
class Item:
    line: int
    custom_id: str
    body: dict
    #: runs that ended in a failure waiting may cure (a 5xx), so far
    attempts: int = 0


class LeaseLost(Exception):
    """This runner no longer holds the batch (or it moved meanwhile): it must leave it."""


class BatchStore:
    def __init__(self, db: Database, files: FileStore) -> None:
        self.db, self.files = db, files

    async def migrate(self) -> None:
        await self.db.migrate("batches", MIGRATIONS)

    # -- files
    async def add_file(self, organization: str, key_id: str, purpose: str, filename: str, data: bytes) -> FileInfo:
        info = FileInfo(new_id("file-"), organization, key_id, purpose, filename, len(data), int(time.time()))
        await self.files.put(info.id, data)  # the bytes first: a listed file always has them
        await self.db.execute(
            "INSERT INTO files (id, organization, key_id, purpose, filename, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (info.id, organization, key_id, purpose, filename, len(data), info.created_at))
        return info

    async def file(self, organization: str, file_id: str) -> FileInfo | None:
        row = await self.db.fetchone(
            "SELECT id, organization, key_id, purpose, filename, bytes, created_at FROM files "
            "WHERE id = ? AND organization = ?", (file_id, organization))
        return None if row is None else FileInfo(*row[:5], int(row[5]), int(row[6]))

    # -- batches
    async def add_batch(self, organization: str, key_id: str, endpoint: str, input_file_id: str, window_s: int,
                        metadata: dict) -> Batch:
        batch_id, now = new_id("batch_"), int(time.time())
        await self.db.execute(
            f"INSERT INTO batches ({_BATCH_COLUMNS}, failures, lease_owner, lease_until_ms) VALUES "
            f"({', '.join('?' * (11 + len(_TIMES)))}, 0, '', 0)",
            (batch_id, organization, key_id, endpoint, input_file_id, "24h", "validating", json.dumps(metadata), "[]",
             "", "", now, now + window_s, *([None] * (len(_TIMES) - 2))))
        return await self.batch(organization, batch_id)

    async def _counts(self, batch_id: str) -> dict[str, int]:
        rows = await self.db.fetchall("SELECT status, COUNT(*) FROM batch_items WHERE batch_id = ? GROUP BY status",
                                      (batch_id,))
        by = {status: int(n) for status, n in rows}
        return {"total": sum(by.values()), "completed": by.get("done", 0), "failed": by.get("failed", 0)}

    async def _batch(self, row: tuple) -> Batch:
        named = dict(zip(_BATCH_COLUMNS.split(", "), row))
        times = {t: None if named[t] is None else int(named[t]) for t in _TIMES}
        return Batch(named["id"], named["organization"], named["key_id"], named["endpoint"], named["input_file_id"],
                     named["completion_window"], named["status"], json.loads(named["metadata"]),
                     json.loads(named["errors"]), named["output_file_id"], named["error_file_id"], times,
                     await self._counts(named["id"]))

    async def batch(self, organization: str | None, batch_id: str) -> Batch | None:
        """A batch of organization's (None: whoever's)."""
        within = "" if organization is None else " AND organization = ?"
        row = await self.db.fetchone(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?{within}",
                                     (batch_id, *(() if organization is None else (organization,))))
        return None if row is None else await self._batch(row)

    async def batches(self, organization: str, limit: int, after: str | None) -> tuple[list[Batch], bool]:
        """Newest first, after the batch `after` (OpenAI's cursor); and whether more follow."""
        args: list[Any] = [organization]
        cursor = ""
        if after:
            anchor = await self.db.fetchone("SELECT created_at, id FROM batches WHERE id = ? AND organization = ?",
                                            (after, organization))
            if anchor is not None:
                cursor = " AND (created_at < ? OR (created_at = ? AND id < ?))"
                args += [int(anchor[0]), int(anchor[0]), anchor[1]]
        rows = await self.db.fetchall(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE organization = ?{cursor} ORDER BY created_at DESC, id DESC "
            f"LIMIT {int(limit) + 1}", tuple(args))
        return [await self._batch(r) for r in rows[:limit]], len(rows) > limit

    async def move(self, batch_id: str, owner: str, expected: tuple[str, ...], status: str, when: str | None = None,
                   **fields: Any) -> None:
        """Moves a batch from one of the expected statuses to status (setting its time and other
        columns), as the holder of its lease; LeaseLost when it is not (another runner has it, or
        the batch moved meanwhile: a cancel)."""
        sets, args = ["status = ?"], [status]
        if when:
            sets.append(f"{when} = ?")
            args.append(int(time.time()))
        for column, value in fields.items():
            sets.append(f"{column} = ?")
            args.append(value)
        moved = await self.db.execute(
            f"UPDATE batches SET {', '.join(sets)} WHERE id = ? AND lease_owner = ? "
            f"AND status IN ({', '.join('?' * len(expected))})", (*args, batch_id, owner, *expected))
        if moved != 1:
            raise LeaseLost(batch_id)

    async def failed_once(self, batch_id: str) -> int:
        """Counts a failure of a runner on the batch (its file cannot be read, say); returns how many."""
        await self.db.execute("UPDATE batches SET failures = failures + 1 WHERE id = ?", (batch_id,))
        row = await self.db.fetchone("SELECT failures FROM batches WHERE id = ?", (batch_id,))
        return int(row[0]) if row else 0

    async def fail_batch(self, batch_id: str, errors: list[dict]) -> None:
        await self.db.execute(
            f"UPDATE batches SET status = 'failed', failed_at = ?, errors = ? WHERE id = ? "
            f"AND status IN ({', '.join('?' * len(ACTIVE))})", (int(time.time()), json.dumps(errors), batch_id, *ACTIVE))

    async def status(self, batch_id: str) -> tuple[str, int]:
        """A batch's status and expiry, cheaply (the runner's loop reads them every turn)."""
        row = await self.db.fetchone("SELECT status, expires_at FROM batches WHERE id = ?", (batch_id,))
        return row[0], int(row[1])

    async def cancel(self, organization: str, batch_id: str) -> Batch | None:
        await self.db.execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ? AND organization = ? "
            "AND status IN ('validating', 'in_progress')", (int(time.time()), batch_id, organization))
        return await self.batch(organization, batch_id)

    # -- the runners' side
    async def claim(self, owner: str, lease_s: float) -> str | None:
        """Takes the lease of the oldest active batch nobody holds; its id, or None."""
        now = int(time.time() * 1000)
        row = await self.db.fetchone(
            f"SELECT id FROM batches WHERE status IN ({', '.join('?' * len(ACTIVE))}) AND lease_until_ms < ? "
            "ORDER BY created_at, id LIMIT 1", (*ACTIVE, now))
        if row is None:
            return None
        taken = await self.db.execute(
            "UPDATE batches SET lease_owner = ?, lease_until_ms = ? WHERE id = ? AND lease_until_ms < ?",
            (owner, now + int(lease_s * 1000), row[0], now))
        return row[0] if taken == 1 else None

    async def renew(self, batch_id: str, owner: str, lease_s: float) -> bool:
        """Extends the lease; False when another runner has it now (this one must stop)."""
        return await self.db.execute("UPDATE batches SET lease_until_ms = ? WHERE id = ? AND lease_owner = ?",
                                     (int(time.time() * 1000 + lease_s * 1000), batch_id, owner)) == 1

    async def release(self, batch_id: str, owner: str) -> None:
        await self.db.execute("UPDATE batches SET lease_until_ms = 0 WHERE id = ? AND lease_owner = ?",
                              (batch_id, owner))

    async def add_items(self, batch_id: str, items: list[Item]) -> None:
        await self.db.transaction([
            ("INSERT INTO batch_items (batch_id, line, custom_id, body, status, result, attempts, next_at_ms) "
             "VALUES (?, ?, ?, ?, 'pending', '', 0, 0) ON CONFLICT (batch_id, line) DO NOTHING", (batch_id, i.line, i.custom_id, json.dumps(i.body)))
            for i in items])

    async def pending(self, batch_id: str, limit: int, exclude: set[int] = frozenset()) -> list[Item]:
        """Requests to run now (not waiting out a retry's pause), in order, but those in exclude."""
        rows = await self.db.fetchall(
            "SELECT line, custom_id, body, attempts FROM batch_items WHERE batch_id = ? AND status = 'pending' "
            f"AND next_at_ms <= ? ORDER BY line LIMIT {int(limit) + len(exclude)}", (batch_id, int(time.time() * 1000)))
        items = [Item(int(line), custom_id, json.loads(body), int(attempts)) for line, custom_id, body, attempts in rows]
        return [i for i in items if i.line not in exclude][:limit]

    async def has_pending(self, batch_id: str) -> bool:
        return await self.db.fetchone("SELECT 1 FROM batch_items WHERE batch_id = ? AND status = 'pending' LIMIT 1",
                                      (batch_id,)) is not None

    async def retry_later(self, batch_id: str, line: int, pause_s: float) -> None:
        await self.db.execute(
            "UPDATE batch_items SET attempts = attempts + 1, next_at_ms = ? WHERE batch_id = ? AND line = ? "
            "AND status = 'pending'", (int((time.time() + pause_s) * 1000), batch_id, line))

    async def finish_item(self, batch_id: str, line: int, ok: bool, result: dict) -> None:
        await self.db.execute(
            "UPDATE batch_items SET status = ?, result = ? WHERE batch_id = ? AND line = ? AND status = 'pending'",
            ("done" if ok else "failed", json.dumps(result, ensure_ascii=False), batch_id, line))

    async def fail_pending(self, batch_id: str, result: dict) -> None:
        """Every request not run yet fails with result (the batch expired or was cancelled)."""
        await self.db.execute(
            "UPDATE batch_items SET status = 'failed', result = ? WHERE batch_id = ? AND status = 'pending'",
            (json.dumps(result), batch_id))

    async def results(self, batch_id: str) -> list[tuple[int, str, str, str]]:
        """(line, custom_id, status, result JSON) of every request, in the input file's order."""
        rows = await self.db.fetchall(
            "SELECT line, custom_id, status, result FROM batch_items WHERE batch_id = ? ORDER BY line", (batch_id,))
        return [(int(line), custom_id, status, result) for line, custom_id, status, result in rows]
