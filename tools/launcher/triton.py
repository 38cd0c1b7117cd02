"""Runs the real Triton Inference Server shipped in the nvidia-pytriton wheel, on the CPU.

Recipe (shared/notes/triton-on-cpu.md): the Python backend's stub must sit next to the backend
library, and the virtual environment's bin/ must come first on PATH, because the stub runs the
first python3 it finds there and so imports that environment's packages (llama_cpp, numpy).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tools.launcher.ports import free_ports
from tools.launcher.triton_args import trace_args, triton_argv
from tools.launcher.probes import http_ready, wait_ready
from tools.launcher.process import log_tail, proc_state, spawn, stop

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CPU_MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "cpu"


class TritonStartError(RuntimeError):
    pass


def triton_home() -> pathlib.Path:
    import pytriton

    return pathlib.Path(pytriton.__file__).parent / "tritonserver"


def _install_python_stub(home: pathlib.Path) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = home / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    if not target.exists() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)


@dataclass
class TritonServer:
    """A running tritonserver process and its endpoints."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: pathlib.Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def is_running(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, models: Sequence[str], timeout_s: float) -> None:
        """Blocks until the server and every model answer ready, or raises with the log's tail."""
        urls = [f"http://127.0.0.1:{self.http_port}{path}"
                for path in ("/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models))]
        try:
            wait_ready(lambda: http_ready(*urls), "tritonserver", timeout_s, self.process)
        except (RuntimeError, TimeoutError) as failure:
            raise TritonStartError(f"{failure}:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM (Triton unloads its models and exits), then SIGKILL to it and its model stubs."""
        stop(self.process, timeout_s)

    def kill(self) -> None:
        """SIGKILL the server and its model stubs (they share its process group)."""
        stop(self.process, timeout_s=0)


def model_stubs(group: int) -> list[int]:
    """The live Python-backend stub processes in a Triton's process group (one per model instance)."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        found = proc_state(int(entry.name)) if entry.name.isdigit() else None
        if found is None or found[1] != group or found[0] == "Z":
            continue
        try:
            if b"triton_python_backend_stub" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile
    return pids


def stub_died(process: subprocess.Popen) -> str | None:
    """Why a running Triton cannot serve: its model's stub died (a crash, the OOM killer). Triton
    2.51 neither restarts a decoupled model's stub nor stops saying the model is ready, so every
    request after it fails ("Stub process ... is not healthy") until Triton itself restarts."""
    return None if model_stubs(process.pid) else "its model's Python stub is gone (Triton does not restart it)"








def start_triton(
    log_path: pathlib.Path,
    model_repository: pathlib.Path = CPU_MODEL_REPOSITORY,
    extra_args: Sequence[str] = (),
    ports: Sequence[int] = (),
    trace_url: str = "",
    env: Mapping[str, str] = {},
) -> TritonServer:
    """Starts tritonserver on loopback, on ports (http, grpc, metrics) or free ones, with env added
    to its environment (its models read their settings there); call wait_ready() before using it."""
    home = triton_home()
    _install_python_stub(home)
    http_port, grpc_port, metrics_port = ports or free_ports(3)
    path = os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")])
    # Shared-memory regions of its own: two Tritons on one host (`cloudach up --replicas 2`) would
    # otherwise share the Python backend's region names, and one restarting broke the other's model.
    shm = f"--backend-config=python,shm-region-prefix-name=cloudach_triton_{grpc_port}_"
    args = triton_argv(home / "bin" / "tritonserver", home / "backends", model_repository, "127.0.0.1",
                       (http_port, grpc_port, metrics_port), [shm, *trace_args(trace_url), *extra_args])
    # Its own session keeps our terminal's Ctrl-C from it (the launcher stops it in order);
    # SIGKILL when the launcher dies, as its stubs cannot drain without it anyway.
    process = spawn(args, log_path, {**env, "PATH": path}, own_session=True, death_signal=signal.SIGKILL)
    return TritonServer(process, http_port, grpc_port, metrics_port, log_path)


def start_triton_ready(log_path: pathlib.Path, models: Sequence[str], timeout_s: float, attempts: int = 3,
                       settle_s: float = 2.0, **options) -> TritonServer:
    """start_triton(), ready, and still alive settle_s later, or started again (attempts in all).

    tritonserver 2.51 now and then dies of SIGSEGV within a moment of starting, in its own C++
    (seen in test and bench runs; once in CI also 43 s into serving, in its gRPC stream handler,
    which tests/integration/conftest.py survives; Triton's issues report the same, and
    replicate/cog-triton restarts it the same way). The supervised stack restarts it like any crash;
    this is for a caller without a supervisor (the tests' session server, the benchmarks)."""
    for attempt in range(1, attempts + 1):
        server = start_triton(log_path.with_name(f"{log_path.stem}-{attempt}{log_path.suffix}") if attempt > 1
                              else log_path, **options)
        try:
            server.wait_ready(models, timeout_s)
            time.sleep(settle_s)
            if server.is_running():
                return server
            failure = f"tritonserver exited ({server.process.returncode}) just after it was ready"
        except TritonStartError as error:
            failure = str(error)
        server.kill()
        if attempt == attempts:
            raise TritonStartError(f"{failure}:\n{server.log_tail()}")
        log.warning("tritonserver failed to start (attempt %d of %d), starting it again: %s\n%s",
                    attempt, attempts, failure.splitlines()[0], server.log_tail(12))
    raise AssertionError("unreachable")
