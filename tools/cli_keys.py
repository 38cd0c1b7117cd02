"""`cloudach keys create|list|revoke`: auth_svc's admin RPCs, called with an admin key."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import pathlib
import sys

import grpc

from cloudach import defaults
from cloudach.auth.v1 import auth_pb2 as pb
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.rpc.client import service_channel
from cloudach.rpc.errors import error_from_rpc
from tools.client import api_key, table, token_metadata
from tools.settings import ClientSettings

ROLE_NAMES = {"member": pb.KEY_ROLE_MEMBER, "org-admin": pb.KEY_ROLE_ORG_ADMIN,
              "platform-admin": pb.KEY_ROLE_PLATFORM_ADMIN, "service": pb.KEY_ROLE_SERVICE}


def add_parser(commands: argparse._SubParsersAction, client: ClientSettings) -> None:
    keys = commands.add_parser("keys", help="create, list, update and revoke API keys, set organizations' budgets "
                                            "(needs an admin key)")
    keys.add_argument("--auth-target", default=client.auth_target)
    keys.add_argument("--admin-key-file", type=pathlib.Path, default=pathlib.Path(defaults.DEV_API_KEY_FILE),
                      help="file holding an admin key (CLOUDACH_API_KEY takes precedence)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; it is shown this once")
    create.add_argument("--org", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0: unlimited)")
    create.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: unlimited)")
    create.add_argument("--max-concurrency", type=int, default=0, help="concurrent streams (0: unlimited)")
    create.add_argument("--models", default="", help="comma-separated models it may use (default: all)")
    create.add_argument("--role", choices=tuple(ROLE_NAMES), default="member",
                        help="member (inference, its organization's usage), org-admin (also manages its "
                             "organization's keys), platform-admin (every organization), service (reports usage)")
    create.add_argument("--admin", action="store_true", help="the same as --role platform-admin")
    _budget_flags(create, default=0)
    update = actions.add_parser("update", help="change a key's spend budgets")
    update.add_argument("key_id")
    _budget_flags(update, default=None)
    org_budget = actions.add_parser("org-budget", help="set an organization's spend budgets (all its keys together)")
    org_budget.add_argument("--org", required=True)
    _budget_flags(org_budget, default=0)
    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--org", default="")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")


def _budget_flags(parser: argparse.ArgumentParser, default: int | None) -> None:
    for period in ("daily", "monthly"):
        parser.add_argument(f"--budget-{period}", type=int, default=default, metavar="MICROS",
                            help=f"spend per {'UTC day' if period == 'daily' else 'calendar month'} in micro-units of "
                                 "the billing currency (1 USD = 1000000; 0: no budget)")


def _when(ts) -> str:
    if not ts.seconds:
        return "-"
    return datetime.datetime.fromtimestamp(ts.seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def _row(k: pb.ApiKeyInfo) -> dict:
    return {
        "key_id": k.key_id, "key": k.display_prefix, "organization": k.organization, "name": k.name,
        "status": pb.KeyStatus.Name(k.status).removeprefix("KEY_STATUS_").lower(),
        "role": pb.KeyRole.Name(k.role).removeprefix("KEY_ROLE_").lower().replace("_", "-"), "rpm": k.limits.requests_per_minute, "tpm": k.limits.tokens_per_minute,
        "max_concurrency": k.limits.max_concurrent_streams, "models": ",".join(k.limits.allowed_models) or "*",
        "budget_daily": k.limits.budget_daily_micros, "budget_monthly": k.limits.budget_monthly_micros,
        "created": _when(k.created_at), "last_used": _when(k.last_used_at),
    }


def _table(rows: list[dict]) -> str:
    return table(list(rows[0]), [list(r.values()) for r in rows]) if rows else "(no keys)"


async def _run(args: argparse.Namespace, client: ClientSettings) -> int:
    key = api_key(client, args.admin_key_file)
    async with service_channel(args.auth_target) as channel:
        stub = AuthServiceStub(channel)
        try:
            metadata = await token_metadata(stub, key, admin=True)
            if args.action == "create":
                limits = pb.KeyLimits(requests_per_minute=args.rpm, tokens_per_minute=args.tpm,
                                      max_concurrent_streams=args.max_concurrency,
                                      allowed_models=[m for m in args.models.split(",") if m],
                                      budget_daily_micros=args.budget_daily, budget_monthly_micros=args.budget_monthly)
                created = await stub.CreateApiKey(pb.CreateApiKeyRequest(
                    organization=args.org, name=args.name, limits=limits, admin=args.admin,
                    role=ROLE_NAMES[args.role]), metadata=metadata, timeout=10)
                print(f"created {created.key.key_id} for {created.key.organization}")
                print(f"API key (shown once, store it now): {created.api_key}")
            elif args.action == "list":
                listed = await stub.ListApiKeys(pb.ListApiKeysRequest(organization=args.org), metadata=metadata, timeout=10)
                rows = [_row(k) for k in listed.keys]
                print(json.dumps(rows, indent=2) if args.json else _table(rows))
            elif args.action == "update":
                fields = {name: value for name, value in (("budget_daily_micros", args.budget_daily),
                                                          ("budget_monthly_micros", args.budget_monthly))
                          if value is not None}
                updated = await stub.UpdateApiKey(pb.UpdateApiKeyRequest(key_id=args.key_id, **fields),
                                                  metadata=metadata, timeout=10)
                print(f"updated {updated.key.key_id}: budgets {updated.key.limits.budget_daily_micros} a day, "
                      f"{updated.key.limits.budget_monthly_micros} a month (micros; 0: none)")
            elif args.action == "org-budget":
                budget = pb.Budget(daily_micros=args.budget_daily, monthly_micros=args.budget_monthly)
                set_ = await stub.SetOrganizationBudget(pb.SetOrganizationBudgetRequest(
                    organization=args.org, budget=budget), metadata=metadata, timeout=10)
                print(f"organization {set_.organization}: budgets {set_.budget.daily_micros} a day, "
                      f"{set_.budget.monthly_micros} a month (micros; 0: none)")
            else:
                revoked = await stub.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=args.key_id), metadata=metadata, timeout=10)
                print(f"revoked {revoked.key.key_id} ({revoked.key.display_prefix})")
        except grpc.aio.AioRpcError as failure:
            print(f"error: {error_from_rpc(failure).message}", file=sys.stderr)
            return 1
    return 0


def run(args: argparse.Namespace, client: ClientSettings) -> int:
    return asyncio.run(_run(args, client))
