"""The `cloudach` command: `up` (what `make run` runs), `status`, `keys`, `usage`, `migrate`, `bench`."""

from __future__ import annotations

import argparse
import pathlib
import sys

from cloudach import defaults
from tools import cli_keys, cli_migrate, cli_status, cli_usage
from tools.settings import ClientSettings, StackSettings, variable


def _add_up(commands: argparse._SubParsersAction, stack: StackSettings) -> None:
    up = commands.add_parser("up", help="run the local stack until Ctrl-C (what `make run` calls)")
    up.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path(defaults.STATE_DIR))
    up.add_argument("--port", type=int, help=f"the HTTP API's port (default {stack.port}, or {variable(StackSettings, 'port')})")
    for service in ("inference", "auth", "billing"):
        name = f"{service}_port"
        up.add_argument(f"--{service}-port", type=int,
                        help=f"{service}_svc's gRPC port (default {getattr(stack, name)}, or {variable(StackSettings, name)})")
    up.add_argument("--replicas", type=int, help="run this many of each process, Tritons too (default 1)")
    up.add_argument("--edge-workers", type=int,
                    help="edge processes behind each edge port, one per core (default 1, or "
                         f"{variable(StackSettings, 'edge_workers')}); without --redis each enforces its share of every key's limits")
    up.add_argument("--database", help="postgresql://… shared by auth_svc and billing_svc (default: SQLite files)")
    up.add_argument("--redis", help="redis://… shared by the edges for rate limits (default: none)")


def main(argv: list[str] | None = None) -> int:
    client, stack = ClientSettings.from_env(), StackSettings.from_env()
    parser = argparse.ArgumentParser(prog="cloudach", description="Cloudach: an OpenAI-compatible LLM API")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_up(commands, stack)
    cli_status.add_parser(commands)
    cli_keys.add_parser(commands, client)
    cli_usage.add_parser(commands, client)
    cli_migrate.add_parser(commands)
    from bench import cli as bench_cli

    bench_cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "up":
        from tools.launcher.stack import run_stack

        chosen = stack.with_options(port=args.port, inference_port=args.inference_port,
                                    auth_port=args.auth_port, billing_port=args.billing_port,
                                    replicas=args.replicas, edge_workers=args.edge_workers,
                                    database_url=args.database, redis_url=args.redis)
        if chosen.replicas < 1 or chosen.edge_workers < 1:
            parser.error("--replicas and --edge-workers must be at least 1")
        return run_stack(args.state_dir, chosen)
    if args.command == "status":
        return cli_status.run(args, client)
    if args.command == "keys":
        return cli_keys.run(args, client)
    if args.command == "usage":
        return cli_usage.run(args, client)
    if args.command == "migrate":
        return cli_migrate.run(args)
    return bench_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
