"""`cloudach usage`: billed usage of an organization or key, as a table or the JSON of GET /v1/usage."""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cloudach import defaults
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.billing.v1 import billing_pb2 as pb
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.rpc.client import service_channel
from cloudach.rpc.errors import error_from_rpc
from edge.usage import usage_json  # the very JSON the HTTP API returns
from tools.client import api_key, table, token_metadata
from tools.settings import ClientSettings


def add_parser(commands: argparse._SubParsersAction, client: ClientSettings) -> None:
    usage = commands.add_parser("usage", help="billed usage of an organization or key, by day and model")
    usage.add_argument("--auth-target", default=client.auth_target)
    usage.add_argument("--billing-target", default=client.billing_target)
    usage.add_argument("--key-file", type=pathlib.Path, default=pathlib.Path(defaults.DEV_API_KEY_FILE),
                       help="file holding the API key to ask with (CLOUDACH_API_KEY takes precedence)")
    scope = usage.add_mutually_exclusive_group(required=True)
    scope.add_argument("--org")
    scope.add_argument("--key-id")
    usage.add_argument("--start", type=int, help="unix seconds (default: the beginning)")
    usage.add_argument("--end", type=int, help="unix seconds (default: now)")
    usage.add_argument("--json", action="store_true")


async def _usage(args: argparse.Namespace, client: ClientSettings) -> int:
    scope, value = ("organization", args.org) if args.org else ("key_id", args.key_id)
    query = pb.GetUsageRequest(**{scope: value})
    if args.start is not None:
        query.start_time.CopyFrom(Timestamp(seconds=args.start))
    if args.end is not None:
        query.end_time.CopyFrom(Timestamp(seconds=args.end))
    key = api_key(client, args.key_file)
    async with service_channel(args.auth_target) as auth, service_channel(args.billing_target) as billing:
        try:
            metadata = await token_metadata(AuthServiceStub(auth), key)
            reply = await BillingServiceStub(billing).GetUsage(query, metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as failure:
            print(f"error: {error_from_rpc(failure).message}", file=sys.stderr)
            return 1
    body = usage_json(reply, scope, value)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = [*body["data"], {**body["total"], "day": "total", "model": ""}]
    header = ("day", "model", "requests", "prompt_tokens", "cached_tokens", "completion_tokens",
              f"cost ({body['currency']})")
    print(table(header, [(r["day"], r["model"], r["requests"], r["prompt_tokens"], r["cached_tokens"],
                          r["completion_tokens"], f"{r['cost_micros'] / 1_000_000:.6f}") for r in rows]))
    return 0


def run(args: argparse.Namespace, client: ClientSettings) -> int:
    return asyncio.run(_usage(args, client))
