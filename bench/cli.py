"""`cloudach bench [scenario|all]`: runs scenarios, writes JSON, Markdown and PNG plots."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time


def add_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmark the platform on this machine (starts its own stacks)")
    bench.add_argument("scenario", choices=("overhead", "relay", "workers", "levers", "real", "guided", "features", "prefix", "batch", "all"), nargs="?", default="all")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    bench.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    bench.add_argument("--rate", type=float, default=100.0,
                       help="the synthetic model's tokens/s per stream in the overhead scenario (default 100)")
    bench.add_argument("--relay-concurrency", default="100,500,1000,2000")
    bench.add_argument("--real-concurrency", default="1,4,16")
    bench.add_argument("--guided-concurrency", default="1,8")
    bench.add_argument("--features-concurrency", type=int, default=4)
    bench.add_argument("--edge-workers", default="1,2", help="edge processes per run of the workers scenario")
    bench.add_argument("--no-llama-server", action="store_true", help="skip the llama_cpp.server baseline")
    bench.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))


def run(args: argparse.Namespace) -> int:
    from bench import report, scenarios  # numpy, aiohttp, grpc: only when benchmarking

    options = scenarios.Options(
        duration_s=args.duration, max_tokens=args.max_tokens, tokens_per_s=args.rate,
        relay_concurrency=tuple(int(c) for c in args.relay_concurrency.split(",")),
        real_concurrency=tuple(int(c) for c in args.real_concurrency.split(",")),
        guided_concurrency=tuple(int(c) for c in args.guided_concurrency.split(",")),
        features_concurrency=args.features_concurrency,
        edge_workers=tuple(int(c) for c in args.edge_workers.split(",")),
    )
    chosen = ("overhead", "relay", "workers", "levers", "real", "guided", "features", "prefix", "batch") if args.scenario == "all" else (args.scenario,)
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()},
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "options": vars(options), "scenarios": {}}
    markdown = []
    for name in chosen:
        print(f"== {name}", flush=True)
        if name == "overhead":
            rows = scenarios.overhead(options)
        elif name == "relay":
            rows = scenarios.relay(options)
        elif name == "guided":
            rows = scenarios.guided(options)
        elif name == "features":
            rows = scenarios.features(options)
        elif name == "workers":
            rows = scenarios.workers(options)
        elif name == "levers":
            rows = scenarios.levers(options)
        elif name == "prefix":
            rows = scenarios.prefix(options)
        elif name == "batch":
            rows = scenarios.batch(options)
        else:
            rows = scenarios.real_model(options, not args.no_llama_server)
        document["scenarios"][name] = rows
        processes = {"real": ["tritonserver", "edge", "llama_cpp.server"], "guided": ["tritonserver"],
                     "features": ["tritonserver", "inference_svc", "edge"],
                     "workers": ["tritonserver", "inference_svc", "edge"], "levers": ["tritonserver", "inference_svc", "edge"],
                     "prefix": ["tritonserver", "inference_svc", "edge"],
                     "batch": ["tritonserver", "inference_svc", "edge"]}.get(
            name, [*scenarios.STACK, "bench client"])
        table = report.markdown(rows, processes)
        markdown.append(f"## {name}\n\n{table}\n")
        print(table, flush=True)
        report.plot(rows, args.out / f"{name}.png", name)
    (args.out / "results.json").write_text(json.dumps(document, indent=2))
    (args.out / "results.md").write_text("\n".join(markdown))
    print(f"written: {args.out}/results.json, results.md, *.png", flush=True)
    return 0
