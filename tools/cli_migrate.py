"""`cloudach migrate`: applies auth_svc's and billing_svc's database migrations and exits (the
Kubernetes migration Job). The services apply any left at start too, under the same lock, so a
replica never serves on an older schema and replicas starting together never race."""

from __future__ import annotations

import argparse
import asyncio

from auth_svc.config import AuthConfig
from auth_svc.store import KeyStore
from billing_svc.config import BillingConfig
from billing_svc.store import UsageStore
from cloudach.db import Database


def add_parser(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("migrate", help="apply the databases' migrations (CLOUDACH_AUTH_DATABASE_URL, "
                                        "CLOUDACH_BILLING_DATABASE_URL) and exit")


async def _migrate() -> None:
    for url, store in ((AuthConfig.from_env().database_url, KeyStore),
                       (BillingConfig.from_env().database_url, UsageStore)):
        db = Database(url)
        try:
            await store(db).migrate()
        finally:
            await db.close()
        print(f"migrated {store.__name__} ({url.split(':')[0]})", flush=True)


def run(args: argparse.Namespace) -> int:
    asyncio.run(_migrate())
    return 0
