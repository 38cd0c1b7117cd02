"""Usage records in SQLite or PostgreSQL: the ledger (one row per request id) and inference_svc's
generation reports, from which the ledger gets the requests the edge never reported.

Why two sources: the edge is the only process that knows what its client received, but it can die
holding a stream; inference_svc knows exactly what the model generated (never less than the client
received: the client can only get what the model sent) and survives the edge. So the edge's record
is the one that counts; a request with reports and no edge record once the reports have settled is
reconstructed from them as `interrupted` and priced at zero (our crash cut it); an edge record that
arrives later still replaces it. No per-token write is needed for this, and none is made.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cloudach.prices import Price
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
    # Who the row came from: "edge", or "inference" (reconstructed from generation reports).
    """
    ALTER TABLE usage_records ADD COLUMN source TEXT NOT NULL DEFAULT 'edge';
    CREATE TABLE generation_reports (
        generation_id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        organization TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        outcome TEXT NOT NULL,
        started_at_ms BIGINT NOT NULL,
        ended_at_ms BIGINT NOT NULL,
        received_at_ms BIGINT NOT NULL
    );
    CREATE INDEX generation_reports_request ON generation_reports (request_id);
    CREATE INDEX generation_reports_received ON generation_reports (received_at_ms)
    """,
    # Prompt caching (the model's count of prompt tokens served from a cached prefix, and their
    # price) and batch jobs' requests; the usage API reads time ranges of an organization.
    """
    ALTER TABLE usage_records ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_records ADD COLUMN cached_input_per_million_micros BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE usage_records ADD COLUMN batch_id TEXT NOT NULL DEFAULT '';
    CREATE INDEX usage_records_org_started ON usage_records (organization, started_at_ms)
    """,
]
#: a row's cost in pico-units of the currency (tokens × micro-units per million); sum, then // 1,000,000
INPUT_PICOS = "(prompt_tokens - cached_tokens) * input_per_million_micros"
CACHED_PICOS = "cached_tokens * cached_input_per_million_micros"
OUTPUT_PICOS = "completion_tokens * output_per_million_micros"
COST_PICOS = f"{INPUT_PICOS} + {CACHED_PICOS} + {OUTPUT_PICOS}"
_LEDGER_COLUMNS = ("request_id, key_id, organization, model, prompt_tokens, completion_tokens, outcome, started_at_ms, "
                   "ended_at_ms, time_to_first_token_ns, day, input_per_million_micros, output_per_million_micros, "
                   "end_user, source, cached_tokens, cached_input_per_million_micros, batch_id")
_REPLACED = ", ".join(f"{c} = excluded.{c}" for c in _LEDGER_COLUMNS.split(", ")[1:])


@dataclass(frozen=True)
class Record:
    request_id: str
    key_id: str
    organization: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str  # "completed", "cancelled_by_client", "failed_mid_stream" or "interrupted"
    started_at_ms: int
    ended_at_ms: int
    time_to_first_token_ns: int
    user: str = ""
    #: of prompt_tokens, those served from a cached prefix
    cached_tokens: int = 0
    #: the batch job it ran for ("" for an interactive request)
    batch_id: str = ""


@dataclass(frozen=True)
class Bucket:
    day: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Grouping:
    """AggregateUsage's question: an organization's requests started in [start_ms, end_ms), in
    buckets of bucket_ms from start_ms, grouped by any of key, model and batch, filtered."""

    organization: str
    start_ms: int
    end_ms: int
    bucket_ms: int
    by_key: bool = False
    by_model: bool = False
    by_batch: bool = False
    key_ids: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    batch: bool | None = None


@dataclass(frozen=True)
class Group:
    bucket: int
    key_id: str | None
    model: str | None
    batch: bool | None
    requests: int
    input_tokens: int
    input_cached_tokens: int
    output_tokens: int
    input_cost_picos: int
    cached_input_cost_picos: int
    output_cost_picos: int


def utc_day(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d")


class UsageStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def migrate(self) -> None:
        await self._db.migrate("billing", MIGRATIONS)

    async def record(self, r: Record, price: Price) -> bool:
        """Stores the edge's record unless it has one with its request id; it replaces a row
        reconstructed from generation reports, and a batch request's run that did not complete
        (the batch ran it again). Returns whether it changed the ledger."""
        changed = await self._db.execute(
            f"INSERT INTO usage_records ({_LEDGER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'edge', "
            f"?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET {_REPLACED} WHERE usage_records.source = 'inference' "
            # a batch request runs again under its id after a run that did not complete: that run counts
            "OR (usage_records.batch_id <> '' AND usage_records.outcome <> 'completed')",
            (r.request_id, r.key_id, r.organization, r.model, r.prompt_tokens, r.completion_tokens, r.outcome,
             r.started_at_ms, r.ended_at_ms, r.time_to_first_token_ns, utc_day(r.started_at_ms),
             price.input_per_million_micros, price.output_per_million_micros, r.user,
             r.cached_tokens, price.cached_input, r.batch_id),
        )
        return changed == 1

    async def report(self, generation_id: str, r: Record, received_at_ms: int) -> bool:
        """Stores inference_svc's report of one generation of request r.request_id, once."""
        changed = await self._db.execute(
            "INSERT INTO generation_reports (generation_id, request_id, key_id, organization, model, prompt_tokens, "
            "completion_tokens, outcome, started_at_ms, ended_at_ms, received_at_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (generation_id) DO NOTHING",
            (generation_id, r.request_id, r.key_id, r.organization, r.model, r.prompt_tokens, r.completion_tokens,
             r.outcome, r.started_at_ms, r.ended_at_ms, received_at_ms),
        )
        return changed == 1

    async def reconcile(self, settled_before_ms: int) -> int:
        """Puts in the ledger, as `interrupted` at price zero, every request whose reports all came
        before settled_before_ms and that the edge has not reported; returns how many. Reports of
        requests the ledger holds are dropped once settled, so the table keeps about a settling
        time of traffic (an edge record that comes later needs no report to replace a row)."""
        await self._db.execute(
            "DELETE FROM generation_reports WHERE received_at_ms < ? AND EXISTS "
            "(SELECT 1 FROM usage_records u WHERE u.request_id = generation_reports.request_id)",
            (settled_before_ms,),
        )
        groups = await self._db.fetchall(
            "SELECT request_id, MIN(key_id), MIN(organization), MIN(model), SUM(prompt_tokens), SUM(completion_tokens), "
            "MIN(started_at_ms), MAX(ended_at_ms) FROM generation_reports r "
            "WHERE NOT EXISTS (SELECT 1 FROM usage_records u WHERE u.request_id = r.request_id) "
            "GROUP BY request_id HAVING MAX(received_at_ms) < ? LIMIT 1000",
            (settled_before_ms,),
        )
        added = 0
        for request_id, key_id, org, model, prompt, completion, started, ended in groups:
            added += await self._db.execute(
                f"INSERT INTO usage_records ({_LEDGER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 'interrupted', ?, ?, 0, ?, 0, 0, "
                "'', 'inference', 0, 0, '') ON CONFLICT (request_id) DO NOTHING",
                (request_id, key_id, org, model, int(prompt), int(completion), int(started), int(ended),
                 utc_day(int(started))),
            )
        return added

    async def usage(self, column: str, value: str, start_ms: int, end_ms: int,
                    organization: str | None = None) -> list[Bucket]:
        """Buckets by UTC day and model for one organization or key, started in [start_ms, end_ms);
        organization, when given, limits them to that organization's records."""
        assert column in ("organization", "key_id")
        within = "" if organization is None else " AND organization = ?"
        rows = await self._db.fetchall(
            "SELECT day, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
            f"SUM({COST_PICOS}), SUM(cached_tokens) "
            f"FROM usage_records WHERE {column} = ?{within} AND started_at_ms >= ? AND started_at_ms < ? "
            "GROUP BY day, model ORDER BY day, model",
            (value, *(() if organization is None else (organization,)), start_ms, end_ms),
        )
        return [Bucket(day, model, int(n), int(p), int(c), int(picos) // 1_000_000, int(cached))
                for day, model, n, p, c, picos, cached in rows]

    async def aggregate(self, q: Grouping) -> list[Group]:
        """Sums per bucket and group, buckets in order (only those with requests)."""
        keys = [("key_id", q.by_key), ("model", q.by_model), ("batch_id <> ''", q.by_batch)]
        grouped = [column for column, wanted in keys if wanted]
        where, args = ["organization = ?", "started_at_ms >= ?", "started_at_ms < ?"], [q.organization, q.start_ms, q.end_ms]
        for column, values in (("key_id", q.key_ids), ("model", q.models)):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        if q.batch is not None:
            where.append("batch_id <> ''" if q.batch else "batch_id = ''")
        bucket = f"(started_at_ms - {int(q.start_ms)}) / {int(q.bucket_ms)}"
        rows = await self._db.fetchall(
            f"SELECT {', '.join([bucket, *grouped])}, COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), "
            f"SUM(completion_tokens), SUM({INPUT_PICOS}), SUM({CACHED_PICOS}), SUM({OUTPUT_PICOS}) "
            f"FROM usage_records WHERE {' AND '.join(where)} GROUP BY {', '.join([bucket, *grouped])} "
            f"ORDER BY {', '.join(str(i + 1) for i in range(1 + len(grouped)))}",
            tuple(args),
        )
        groups = []
        for row in rows:
            row = list(row)
            index = int(row.pop(0))
            named = {column: row.pop(0) for column in grouped}
            numbers = [int(v or 0) for v in row]
            groups.append(Group(index, named.get("key_id"), named.get("model"),
                                None if "batch_id <> ''" not in named else bool(named["batch_id <> ''"]), *numbers))
        return groups

    async def get(self, request_id: str) -> Record | None:
        row = await self._db.fetchone(
            "SELECT request_id, key_id, organization, model, prompt_tokens, completion_tokens, outcome, "
            "started_at_ms, ended_at_ms, time_to_first_token_ns, end_user, cached_tokens, batch_id "
            "FROM usage_records WHERE request_id = ?",
            (request_id,),
        )
        if row is None:
            return None
        return Record(*row[:4], int(row[4]), int(row[5]), row[6], int(row[7]), int(row[8]), int(row[9]), row[10],
                      int(row[11]), row[12])
