"""A stack for a benchmark: the same supervised processes as `make run`, on free ports, over a
chosen model repository (the synthetic one, or the CPU model)."""

from __future__ import annotations

import contextlib
import pathlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from tools.launcher.ports import free_ports
from tools.launcher.stack import stack_children
from tools.launcher.supervisor import Supervisor
from tools.settings import StackSettings

REPO = pathlib.Path(__file__).resolve().parents[1]
SYNTHETIC = REPO / "deploy" / "triton" / "bench"
CPU = REPO / "deploy" / "triton" / "cpu"

#: Generous admission for load tests: the defaults protect a production replica, not a benchmark.
LOAD_SETTINGS = {"CLOUDACH_EDGE_MAX_REQUESTS": "8192", "CLOUDACH_INFERENCE_MAX_STREAMS": "8192"}


@dataclass
class BenchStack:
    settings: StackSettings
    triton_grpc: str
    api_key: str
    pids: dict[str, tuple[int, ...]]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}/v1"


@contextlib.contextmanager
def bench_stack(model_repository: pathlib.Path, tokens_per_s: float = 0.0, edge_workers: int = 1,
                extra_env: dict[str, str] | None = None) -> Iterator[BenchStack]:
    """edge_workers: edge processes behind the one API port (their CPU is summed as "edge");
    extra_env: settings added to every process's (CLOUDACH_EVENT_LOOP, say)."""
    state = pathlib.Path(tempfile.mkdtemp(prefix="cloudach-bench-")) / ".cloudach"
    edge, inference, auth, billing, *metrics = free_ports(8)
    settings = StackSettings(port=edge, inference_port=inference, auth_port=auth, billing_port=billing,
                             inference_metrics_port=metrics[0], auth_metrics_port=metrics[1],
                             billing_metrics_port=metrics[2], edge_metrics_port=metrics[3], edge_workers=edge_workers)
    env = {**LOAD_SETTINGS, "CLOUDACH_BENCH_TOKENS_PER_S": str(tokens_per_s), **(extra_env or {})}
    supervisor = Supervisor(stack_children(state, settings, model_repository, env), state / "stack.json",
                            say=lambda line: None)
    try:
        supervisor.start_all()
        triton = supervisor.children[0]
        grpc_address = triton.address.split()[0]
        pids: dict[str, tuple[int, ...]] = {}
        for child in supervisor.children:
            name = re.sub(r"-w\d+$", "", child.name)  # an edge worker counts as the edge
            pids[name] = (*pids.get(name, ()), child.process.pid)
        yield BenchStack(settings, grpc_address, (state / "dev-api-key").read_text().strip(), pids)
    finally:
        supervisor.stop_all()
