"""Usage records in SQLite or PostgreSQL: one row per request id, inserted once."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from billing_svc.prices import Price
from cloudach.db import Database

MIGRATIONS = [
    """
    CREATE TABLE usage_records (
        request_id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        organization TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        outcome TEXT NOT NULL,
        started_at_ms BIGINT NOT NULL,
        ended_at_ms BIGINT NOT NULL,
        time_to_first_token_ns BIGINT NOT NULL,
        day TEXT NOT NULL,
        input_per_million_micros BIGINT NOT NULL,
        output_per_million_micros BIGINT NOT NULL
    );
    CREATE INDEX usage_records_org_day ON usage_records (organization, day);
    CREATE INDEX usage_records_key_day ON usage_records (key_id, day)
    """,
    # OpenAI's `user`: the caller's own id for its end user, kept as given ("user" is reserved in SQL).
    "ALTER TABLE usage_records ADD COLUMN end_user TEXT NOT NULL DEFAULT ''",
]


@dataclass(frozen=True)
class Record:
    request_id: str
    key_id: str
    organization: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str  # "completed", "cancelled_by_client" or "failed_mid_stream"
    started_at_ms: int
    ended_at_ms: int
    time_to_first_token_ns: int
    user: str = ""


@dataclass(frozen=True)
class Bucket:
    day: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


def utc_day(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d")


class UsageStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def migrate(self) -> None:
        await self._db.migrate("billing", MIGRATIONS)

    async def record(self, r: Record, price: Price) -> bool:
        """Stores the record unless one with its request id exists; returns whether it was new."""
        changed = await self._db.execute(
            "INSERT INTO usage_records (request_id, key_id, organization, model, prompt_tokens, completion_tokens, "
            "outcome, started_at_ms, ended_at_ms, time_to_first_token_ns, day, input_per_million_micros, "
            "output_per_million_micros, end_user) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (request_id) DO NOTHING",
            (r.request_id, r.key_id, r.organization, r.model, r.prompt_tokens, r.completion_tokens, r.outcome,
             r.started_at_ms, r.ended_at_ms, r.time_to_first_token_ns, utc_day(r.started_at_ms),
             price.input_per_million_micros, price.output_per_million_micros, r.user),
        )
        return changed == 1

    async def usage(self, column: str, value: str, start_ms: int, end_ms: int) -> list[Bucket]:
        """Buckets by UTC day and model for one organization or key, started in [start_ms, end_ms)."""
        assert column in ("organization", "key_id")
        rows = await self._db.fetchall(
            "SELECT day, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
            "SUM(prompt_tokens * input_per_million_micros + completion_tokens * output_per_million_micros) "
            f"FROM usage_records WHERE {column} = ? AND started_at_ms >= ? AND started_at_ms < ? "
            "GROUP BY day, model ORDER BY day, model",
            (value, start_ms, end_ms),
        )
        return [Bucket(day, model, int(n), int(p), int(c), int(nano) // 1_000_000) for day, model, n, p, c, nano in rows]

    async def get(self, request_id: str) -> Record | None:
        row = await self._db.fetchone(
            "SELECT request_id, key_id, organization, model, prompt_tokens, completion_tokens, outcome, "
            "started_at_ms, ended_at_ms, time_to_first_token_ns, end_user FROM usage_records WHERE request_id = ?",
            (request_id,),
        )
        if row is None:
            return None
        return Record(*row[:4], int(row[4]), int(row[5]), row[6], int(row[7]), int(row[8]), int(row[9]), row[10])
