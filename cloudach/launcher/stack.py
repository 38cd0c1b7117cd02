"""The local stack as real processes: Triton with the CPU model, inference_svc, then the edge.

State (logs, the dev API key) lives under the state directory; Ctrl-C or SIGTERM stops
everything, in reverse order, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudach.launcher.triton import TritonServer, start_triton


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen) -> None:
    """Blocks until the gRPC server at address reports SERVING (grpc.health.v1)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"process for {address} exited with {process.returncode}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not serving after {timeout_s}s")


def start_service(module: str, env: dict[str, str], log_path: pathlib.Path) -> subprocess.Popen:
    """`python -m module` with env added to ours, its output appended to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )


def start_grpc_service(module: str, address: str, env: dict[str, str], logs: pathlib.Path,
                       services: list[subprocess.Popen]) -> None:
    """Starts `python -m module`, adds it to services, and returns once it reports SERVING."""
    services.append(start_service(module, env, logs / f"{module}.log"))
    wait_serving(address, 60, services[-1])
    print(f"  {module} ready: gRPC {address}", flush=True)


def wait_http_ok(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def dev_api_key(state_dir: pathlib.Path) -> pathlib.Path:
    """The local stack's API key, made once and kept in a file only its owner can read."""
    path = state_dir / "dev-api-key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text("ck-" + secrets.token_urlsafe(32) + "\n")
    path.chmod(0o600)
    return path


def stop(process: subprocess.Popen, timeout_s: float = 35) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_stack(state_dir: pathlib.Path, inference_port: int, edge_port: int, auth_port: int = 50052,
              billing_port: int = 50053) -> int:
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    key_file = dev_api_key(state_dir)
    data = (state_dir / "data").resolve()
    print(f"starting Triton Inference Server with the CPU model (log: {logs / 'tritonserver.log'})", flush=True)
    triton = start_triton(logs / "tritonserver.log")
    services: list[subprocess.Popen] = []
    try:
        triton.wait_ready(["tensorrt_llm"], timeout_s=120)
        print(f"  Triton ready: gRPC {triton.grpc_url}, metrics {triton.metrics_url}", flush=True)
        auth_address = f"127.0.0.1:{auth_port}"
        start_grpc_service(
            "auth_svc", auth_address,
            {"CLOUDACH_AUTH_LISTEN": auth_address, "CLOUDACH_AUTH_DATABASE_URL": f"sqlite:///{data / 'auth.db'}",
             "CLOUDACH_AUTH_SIGNING_KEY_FILE": str(data / "auth-signing-key.pem"),
             # the dev key becomes an admin key, so `cloudach keys` works against the local stack
             "CLOUDACH_AUTH_BOOTSTRAP_ADMIN_KEY_FILE": str(key_file.resolve())},
            logs, services,
        )
        billing_address = f"127.0.0.1:{billing_port}"
        start_grpc_service(
            "billing_svc", billing_address,
            {"CLOUDACH_BILLING_LISTEN": billing_address, "CLOUDACH_AUTH_TARGET": auth_address,
             "CLOUDACH_BILLING_DATABASE_URL": f"sqlite:///{data / 'billing.db'}"},
            logs, services,
        )
        inference_address = f"127.0.0.1:{inference_port}"
        start_grpc_service(
            "inference_svc", inference_address,
            {"CLOUDACH_TRITON_URLS": triton.grpc_url, "CLOUDACH_INFERENCE_LISTEN": inference_address,
             "CLOUDACH_AUTH_TARGET": auth_address},
            logs, services,
        )
        services.append(start_service(
            "edge",
            {"CLOUDACH_INFERENCE_TARGET": inference_address, "CLOUDACH_PORT": str(edge_port),
             "CLOUDACH_AUTH_TARGET": auth_address, "CLOUDACH_BILLING_TARGET": billing_address,
             "CLOUDACH_EDGE_OUTBOX_PATH": str(data / "edge-outbox.db"),
             # the local stack's edge reports usage with the dev (admin) key's tokens
             "CLOUDACH_EDGE_SERVICE_KEY_FILE": str(key_file.resolve())},
            logs / "edge.log",
        ))
        wait_http_ok(f"http://127.0.0.1:{edge_port}/ready", 60, services[-1])
        print(f"""
Cloudach is up.
  base URL: http://127.0.0.1:{edge_port}/v1
  API key:  {key_file.read_text().strip()}   (also in {key_file})
  model:    smollm2-135m-instruct
  logs:     {logs}/
Ctrl-C stops it.""", flush=True)
        asyncio.run(_wait_for_exit(triton, services))
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping...", flush=True)
        for process in reversed(services):
            stop(process)
        triton.stop()


async def _wait_for_exit(triton: TritonServer, services: list[subprocess.Popen]) -> None:
    from cloudach.rpc.server import wait_for_termination_signal

    signalled = asyncio.create_task(wait_for_termination_signal())
    while not signalled.done():
        if not triton.is_running() or any(p.poll() is not None for p in services):
            signalled.cancel()
            raise RuntimeError("a service of the stack exited; see the logs under .cloudach/logs")
        await asyncio.sleep(0.5)
