"""`cloudach status`: each service of the local stack (up, ready, pid, restarts, address) and the
depth of the edge's usage outbox and inference_svc's report outbox."""

from __future__ import annotations

import argparse
import json
import pathlib

from cloudach import defaults
from cloudach.outbox import queued_records
from tools.launcher.probes import check, describe
from tools.launcher.process import alive
from tools.settings import ClientSettings


def add_parser(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="each local service: up, ready, its address; the outbox's depth")
    status.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path(defaults.STATE_DIR))


def _services(state_dir: pathlib.Path, client: ClientSettings) -> list[dict]:
    """What `cloudach up` wrote about its children; without it, the services at their configured addresses."""
    try:
        return json.loads((state_dir / "stack.json").read_text())["services"]
    except (OSError, ValueError, KeyError):
        edge = f"http://{defaults.address(client.edge_port)}"
        targets = [("auth_svc", client.auth_target), ("billing_svc", client.billing_target),
                   ("inference_svc", client.inference_target)]
        return [*({"name": n, "address": a, "probe": ["grpc", a]} for n, a in targets),
                {"name": "edge", "address": f"{edge}/v1", "probe": ["http", f"{edge}/ready"]}]


def run(args: argparse.Namespace, client: ClientSettings) -> int:
    print(f"{'service':14} {'state':14} {'pid':>8} {'restarts':>8}  address")
    for service in _services(args.state_dir, client):
        state = check(tuple(service["probe"]))
        shown = "starting" if state is None and alive(service.get("pid")) else describe(state)
        print(f"{service['name']:14} {shown:14} {service.get('pid') or '-':>8} {service.get('restarts', '-'):>8}"
              f"  {service['address']}")
    outboxes = (("usage outbox", pathlib.Path(client.outbox_path or args.state_dir / "data" / defaults.EDGE_OUTBOX)),
                ("report outbox", args.state_dir / "data" / defaults.INFERENCE_OUTBOX))  # inference_svc's
    for name, outbox in outboxes:
        count = queued_records(outbox)
        depth = "none yet" if count is None else f"{count} queued"
        print(f"{name:14} {depth:14} {'':>8} {'':>8}  {outbox}")
    return 0
