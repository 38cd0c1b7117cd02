"""`cloudach usage` (billed usage, as a table or the JSON of GET /v1/usage) and `cloudach status`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sqlite3
import sys

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cloudach.auth.v1 import auth_pb2
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.billing.v1 import billing_pb2 as pb
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.launcher.probes import check, describe
from cloudach.launcher.process import alive
from cloudach.rpc.errors import error_from_rpc


def add_parsers(commands: argparse._SubParsersAction) -> None:
    usage = commands.add_parser("usage", help="billed usage of an organization or key, by day and model")
    usage.add_argument("--auth-target", default=os.environ.get("CLOUDACH_AUTH_TARGET", "127.0.0.1:50052"))
    usage.add_argument("--billing-target", default=os.environ.get("CLOUDACH_BILLING_TARGET", "127.0.0.1:50053"))
    usage.add_argument("--key-file", type=pathlib.Path, default=pathlib.Path(".cloudach/dev-api-key"),
                       help="file holding the API key to ask with (CLOUDACH_API_KEY takes precedence)")
    scope = usage.add_mutually_exclusive_group(required=True)
    scope.add_argument("--org")
    scope.add_argument("--key-id")
    usage.add_argument("--start", type=int, help="unix seconds (default: the beginning)")
    usage.add_argument("--end", type=int, help="unix seconds (default: now)")
    usage.add_argument("--json", action="store_true")
    status = commands.add_parser("status", help="each local service: up, ready, its address; the outbox's depth")
    status.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path(".cloudach"))


def _key(path: pathlib.Path) -> str:
    if os.environ.get("CLOUDACH_API_KEY"):
        return os.environ["CLOUDACH_API_KEY"]
    try:
        return path.read_text().strip()
    except OSError:
        sys.exit(f"no API key: set CLOUDACH_API_KEY or create {path}")


async def _usage(args: argparse.Namespace) -> int:
    from edge.usage import usage_json  # the very JSON the HTTP API returns

    scope, value = ("organization", args.org) if args.org else ("key_id", args.key_id)
    query = pb.GetUsageRequest(**{scope: value})
    if args.start is not None:
        query.start_time.CopyFrom(Timestamp(seconds=args.start))
    if args.end is not None:
        query.end_time.CopyFrom(Timestamp(seconds=args.end))
    async with grpc.aio.insecure_channel(args.auth_target) as auth, grpc.aio.insecure_channel(args.billing_target) as billing:
        try:
            token = (await AuthServiceStub(auth).Authenticate(auth_pb2.AuthenticateRequest(api_key=_key(args.key_file)), timeout=10)).token
            reply = await BillingServiceStub(billing).GetUsage(query, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
        except grpc.aio.AioRpcError as failure:
            print(f"error: {error_from_rpc(failure).message}", file=sys.stderr)
            return 1
    body = usage_json(reply, scope, value)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = [*body["data"], {**body["total"], "day": "total", "model": ""}]
    header = ("day", "model", "requests", "prompt_tokens", "completion_tokens", f"cost ({body['currency']})")
    lines = [header] + [(r["day"], r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"],
                         f"{r['cost_micros'] / 1_000_000:.6f}") for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    print("\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)) for line in lines))
    return 0


def _services(state_dir: pathlib.Path) -> list[dict]:
    """What `cloudach up` wrote about its children; without it, the services at their configured addresses."""
    try:
        return json.loads((state_dir / "stack.json").read_text())["services"]
    except (OSError, ValueError, KeyError):
        env = os.environ.get
        edge = f"http://127.0.0.1:{env('CLOUDACH_PORT', '8080')}"
        targets = [("auth_svc", env("CLOUDACH_AUTH_TARGET", "127.0.0.1:50052")),
                   ("billing_svc", env("CLOUDACH_BILLING_TARGET", "127.0.0.1:50053")),
                   ("inference_svc", env("CLOUDACH_INFERENCE_TARGET", "127.0.0.1:50051"))]
        return [*({"name": n, "address": a, "probe": ["grpc", a]} for n, a in targets),
                {"name": "edge", "address": f"{edge}/v1", "probe": ["http", f"{edge}/ready"]}]


def status(args: argparse.Namespace) -> int:
    print(f"{'service':14} {'state':14} {'pid':>8} {'restarts':>8}  address")
    for service in _services(args.state_dir):
        state = check(tuple(service["probe"]))
        shown = "starting" if state is None and alive(service.get("pid")) else describe(state)
        print(f"{service['name']:14} {shown:14} {service.get('pid') or '-':>8} {service.get('restarts', '-'):>8}"
              f"  {service['address']}")
    outbox = pathlib.Path(os.environ.get("CLOUDACH_EDGE_OUTBOX_PATH", str(args.state_dir / "data" / "edge-outbox.db")))
    depth = "none yet"
    if outbox.exists():
        with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as conn:
            depth = f"{conn.execute('SELECT COUNT(*) FROM outbox').fetchone()[0]} queued"
    print(f"{'usage outbox':14} {depth:14} {'':>8} {'':>8}  {outbox}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "usage":
        return asyncio.run(_usage(args))
    return status(args)
