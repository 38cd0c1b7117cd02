"""The `cloudach` command."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloudach", description="Cloudach: an OpenAI-compatible LLM API")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run the local stack until Ctrl-C (what `make run` calls)")
    up.add_argument("--state-dir", type=pathlib.Path, default=pathlib.Path(".cloudach"))
    up.add_argument("--port", type=int, default=int(os.environ.get("CLOUDACH_PORT", "8080")),
                    help="the HTTP API's port (default 8080, or CLOUDACH_PORT)")
    for service, default in (("inference", 50051), ("auth", 50052), ("billing", 50053)):
        variable = f"CLOUDACH_{service.upper()}_PORT"
        up.add_argument(f"--{service}-port", type=int, default=int(os.environ.get(variable, default)),
                        help=f"{service}_svc's gRPC port (default {default}, or {variable})")
    from cloudach import cli_keys, cli_usage

    cli_keys.add_parser(commands)
    cli_usage.add_parsers(commands)
    from bench import cli as bench_cli

    bench_cli.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "keys":
        return cli_keys.run(args)
    if args.command in ("usage", "status"):
        return cli_usage.run(args)
    if args.command == "bench":
        return bench_cli.run(args)
    if args.command == "up":
        from cloudach.launcher.stack import Ports, run_stack

        ports = Ports(edge=args.port, inference=args.inference_port, auth=args.auth_port, billing=args.billing_port)
        return run_stack(args.state_dir, ports)
    return 2


if __name__ == "__main__":
    sys.exit(main())
