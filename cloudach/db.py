"""One small database layer over SQLite (the embedded default) and PostgreSQL (for scale-out).

Services write portable SQL with `?` placeholders; each Database runs its statements on one
worker thread with one connection, so SQLite's threading rules hold and the event loop never
blocks. Migrations are numbered SQL scripts per service, applied once, in order, at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Row = tuple[Any, ...]
#: how long a statement waits for another connection's lock (replicas sharing one file)
BUSY_TIMEOUT_S = 5.0


def _switch_to_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """PRAGMA journal_mode=WAL, retried while another connection holds a lock.

    SQLite answers BUSY to a journal-mode change at once, without calling the busy handler, while
    another connection holds a write lock (replicas starting together on one file): the
    connection's timeout does not cover it, so it is retried here, with jittered backoff."""
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(pause * random.uniform(0.5, 1.5))
        pause = min(pause * 2, 0.1)


class Database:
    def __init__(self, url: str) -> None:
        """url: "sqlite:///path/to/file.db", "sqlite:///:memory:" or "postgresql://..."."""
        if url.startswith("sqlite:///"):
            self.dialect = "sqlite"
        elif url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
        else:
            raise ValueError(f"unsupported database URL (expected sqlite:/// or postgresql://): {url.split(':')[0]}")
        self._url = url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"db-{self.dialect}")
        self._conn: Any = None

    # -- connection (worker thread only) ---------------------------------------------------------

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        if self.dialect == "sqlite":
            path = self._url.removeprefix("sqlite:///")
            if path != ":memory:":
                pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
            _switch_to_wal(conn, BUSY_TIMEOUT_S)
            conn.execute("PRAGMA synchronous=FULL")
        else:
            import psycopg

            conn = psycopg.connect(self._url, autocommit=True)
        self._conn = conn
        return conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def _run(self, work: Callable[[Any], Any]) -> Any:
        try:
            return work(self._connect())
        except Exception as error:
            if self.dialect == "postgresql" and self._conn is not None and self._conn.closed:
                self._conn = None  # a dropped connection: the next call reconnects
            raise error

    async def _call(self, work: Callable[[Any], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, work)

    # -- statements ----------------------------------------------------------------------------

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs one statement in its own transaction; returns the rows it changed."""
        return await self._call(lambda c: c.execute(self._sql(sql), params).rowcount)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._call(lambda c: [tuple(r) for r in c.execute(self._sql(sql), params).fetchall()])

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def transaction(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Runs the statements atomically; returns each one's changed-row count."""

        def work(c: Any) -> list[int]:
            if self.dialect == "sqlite":
                c.execute("BEGIN IMMEDIATE")
                try:
                    counts = [c.execute(self._sql(s), p).rowcount for s, p in statements]
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
                return counts
            with c.transaction():
                return [c.execute(self._sql(s), p).rowcount for s, p in statements]

        return await self._call(work)

    async def migrate(self, service: str, migrations: Sequence[str]) -> int:
        """Applies the service's migrations not applied yet (by position); returns how many ran.

        Safe when several processes start at once on one database: each migration is checked and
        applied under a lock (SQLite's write lock; one PostgreSQL advisory lock)."""

        def applied_already(c: Any, version: int) -> bool:
            query = self._sql("SELECT 1 FROM schema_migrations WHERE service = ? AND version = ?")
            return c.execute(query, (service, version)).fetchone() is not None

        def apply(c: Any, version: int, statements: list[str]) -> bool:
            if applied_already(c, version):
                return False
            for statement in statements:
                c.execute(statement)
            c.execute(self._sql("INSERT INTO schema_migrations (service, version) VALUES (?, ?)"), (service, version))
            return True

        @contextlib.contextmanager
        def locked(c: Any) -> Iterator[None]:
            if self.dialect == "sqlite":
                c.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
            else:
                with c.transaction():
                    c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("cloudach-migrate",))
                    yield

        def work(c: Any) -> int:
            with locked(c):
                c.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (service TEXT NOT NULL, version INTEGER NOT NULL, "
                    "PRIMARY KEY (service, version))"
                )
            applied = 0
            for version, script in enumerate(migrations, start=1):
                with locked(c):
                    applied += apply(c, version, [s.strip() for s in script.split(";") if s.strip()])
            return applied

        return await self._call(work)

    async def close(self) -> None:
        def work() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, work)
        self._executor.shutdown(wait=True)
