"""API keys in SQLite or PostgreSQL (same schema, migrations applied at start)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from cloudach.db import Database
from cloudach.errors import InvalidArgument, NotFound
from auth_svc.keys import display_prefix, key_hash, looks_like_a_key, new_api_key
from auth_svc.roles import ADMIN_ROLES, MEMBER, PLATFORM_ADMIN, ROLES

MIGRATIONS = [
    """
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        display_prefix TEXT NOT NULL,
        organization TEXT NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        admin INTEGER NOT NULL,
        requests_per_minute BIGINT NOT NULL,
        tokens_per_minute BIGINT NOT NULL,
        max_concurrent_streams BIGINT NOT NULL,
        allowed_models TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        last_used_at_ms BIGINT,
        revoked_at_ms BIGINT
    );
    CREATE INDEX api_keys_organization ON api_keys (organization)
    """,
    # The key's role (auth_svc.roles); '' in rows from before roles: admin 1 is a platform admin.
    "ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT ''",
    # Spend budgets (micro-units of the billing currency; 0: none): a key's, and an organization's.
    """
    ALTER TABLE api_keys ADD COLUMN budget_daily_micros BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE api_keys ADD COLUMN budget_monthly_micros BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE organization_budgets (
        organization TEXT PRIMARY KEY,
        daily_micros BIGINT NOT NULL,
        monthly_micros BIGINT NOT NULL
    )
    """,
]
_COLUMNS = ("key_id, key_hash, display_prefix, organization, name, status, admin, requests_per_minute, "
            "tokens_per_minute, max_concurrent_streams, allowed_models, created_at_ms, last_used_at_ms, revoked_at_ms, role, "
            "budget_daily_micros, budget_monthly_micros")
#: last_used_at is written at most this often per key, so authentication stays a read
LAST_USED_RESOLUTION_MS = 60_000


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int = 0  # 0: unlimited
    tokens_per_minute: int = 0
    max_concurrent_streams: int = 0
    allowed_models: tuple[str, ...] = ()  # empty: every model
    #: spend per UTC day and calendar month, in micro-units of the billing currency (0: none)
    budget_daily_micros: int = 0
    budget_monthly_micros: int = 0


@dataclass(frozen=True)
class Budget:
    daily_micros: int = 0  # 0: none
    monthly_micros: int = 0


def check_budget(daily: int, monthly: int, param: str) -> None:
    for value, name in ((daily, "daily"), (monthly, "monthly")):
        if value < 0:
            raise InvalidArgument(f"{param}_{name}_micros must not be negative", param=f"{param}_{name}_micros")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    display_prefix: str
    organization: str
    name: str
    status: str  # "active" or "revoked"
    role: str  # auth_svc.roles: "member", "org_admin", "platform_admin" or "service"
    limits: Limits = field(default_factory=Limits)
    created_at_ms: int = 0
    last_used_at_ms: int | None = None

    @property
    def admin(self) -> bool:
        return self.role in ADMIN_ROLES


def _row_to_key(row: tuple) -> ApiKey:
    (key_id, _hash, prefix, org, name, status, admin, rpm, tpm, conc, models, created, used, _revoked, role,
     daily, monthly) = row
    return ApiKey(
        key_id=key_id, display_prefix=prefix, organization=org, name=name, status=status,
        role=role or (PLATFORM_ADMIN if admin else MEMBER),
        limits=Limits(int(rpm), int(tpm), int(conc), tuple(m for m in models.split(",") if m), int(daily), int(monthly)),
        created_at_ms=int(created), last_used_at_ms=None if used is None else int(used),
    )


class KeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def migrate(self) -> None:
        await self._db.migrate("auth", MIGRATIONS)

    async def create(self, organization: str, name: str, limits: Limits, role: str = MEMBER,
                     api_key: str | None = None) -> tuple[ApiKey, str]:
        """A new key; returns it and its secret (shown this once). api_key imports a given secret."""
        if role not in ROLES:
            raise InvalidArgument(f"unknown role {role!r}", param="role")
        if not organization:
            raise InvalidArgument("organization is required", param="organization")
        for value, param in ((limits.requests_per_minute, "limits.requests_per_minute"),
                             (limits.tokens_per_minute, "limits.tokens_per_minute"),
                             (limits.max_concurrent_streams, "limits.max_concurrent_streams")):
            if value < 0:
                raise InvalidArgument(f"{param} must not be negative", param=param)
        check_budget(limits.budget_daily_micros, limits.budget_monthly_micros, "limits.budget")
        secret = api_key or new_api_key()
        if not looks_like_a_key(secret):
            raise InvalidArgument("an API key is ck- followed by at least 40 URL-safe characters", param="api_key")
        key_id = f"key_{uuid.uuid4().hex[:24]}"
        now = int(time.time() * 1000)
        await self._db.execute(
            f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, key_hash(secret), display_prefix(secret), organization, name, "active",
             int(role == PLATFORM_ADMIN), limits.requests_per_minute, limits.tokens_per_minute,
             limits.max_concurrent_streams, ",".join(limits.allowed_models), now, None, None, role,
             limits.budget_daily_micros, limits.budget_monthly_micros),
        )
        return await self.get(key_id), secret

    async def get(self, key_id: str) -> ApiKey:
        row = await self._db.fetchone(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,))
        if row is None:
            raise NotFound(f"no API key {key_id}", param="key_id")
        return _row_to_key(row)

    async def find_active(self, api_key: str) -> ApiKey | None:
        """The active key with this secret, or None. Records when it was last used."""
        row = await self._db.fetchone(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ? AND status = 'active'", (key_hash(api_key),)
        )
        if row is None:
            return None
        key = _row_to_key(row)
        now = int(time.time() * 1000)
        if key.last_used_at_ms is None or now - key.last_used_at_ms > LAST_USED_RESOLUTION_MS:
            await self._db.execute("UPDATE api_keys SET last_used_at_ms = ? WHERE key_id = ?", (now, key.key_id))
        return key

    async def exists(self, api_key: str) -> bool:
        return await self._db.fetchone("SELECT 1 FROM api_keys WHERE key_hash = ?", (key_hash(api_key),)) is not None

    async def list(self, organization: str = "") -> list[ApiKey]:
        if organization:
            rows = await self._db.fetchall(
                f"SELECT {_COLUMNS} FROM api_keys WHERE organization = ? ORDER BY created_at_ms, key_id", (organization,))
        else:
            rows = await self._db.fetchall(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at_ms, key_id")
        return [_row_to_key(r) for r in rows]

    async def revoke(self, key_id: str) -> ApiKey:
        await self._db.execute(
            "UPDATE api_keys SET status = 'revoked', revoked_at_ms = ? WHERE key_id = ? AND status = 'active'",
            (int(time.time() * 1000), key_id),
        )
        return await self.get(key_id)  # NotFound for an unknown id

    async def set_key_budget(self, key_id: str, daily: int | None, monthly: int | None) -> ApiKey:
        """Changes the budgets given (None: kept)."""
        key = await self.get(key_id)
        daily = key.limits.budget_daily_micros if daily is None else daily
        monthly = key.limits.budget_monthly_micros if monthly is None else monthly
        check_budget(daily, monthly, "budget")
        await self._db.execute("UPDATE api_keys SET budget_daily_micros = ?, budget_monthly_micros = ? WHERE key_id = ?",
                               (daily, monthly, key_id))
        return await self.get(key_id)

    async def organization_budget(self, organization: str) -> Budget:
        row = await self._db.fetchone(
            "SELECT daily_micros, monthly_micros FROM organization_budgets WHERE organization = ?", (organization,))
        return Budget() if row is None else Budget(int(row[0]), int(row[1]))

    async def set_organization_budget(self, organization: str, budget: Budget) -> Budget:
        if not organization:
            raise InvalidArgument("organization is required", param="organization")
        check_budget(budget.daily_micros, budget.monthly_micros, "budget")
        await self._db.execute(
            "INSERT INTO organization_budgets (organization, daily_micros, monthly_micros) VALUES (?, ?, ?) "
            "ON CONFLICT (organization) DO UPDATE SET daily_micros = excluded.daily_micros, "
            "monthly_micros = excluded.monthly_micros",
            (organization, budget.daily_micros, budget.monthly_micros))
        return budget
