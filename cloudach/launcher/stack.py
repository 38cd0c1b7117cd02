"""The local stack as real processes: Triton with the CPU model, then inference_svc.

State (logs) lives under the state directory; Ctrl-C or SIGTERM stops everything, in reverse order.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time

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


def start_inference(triton: TritonServer, port: int, logs: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["CLOUDACH_TRITON_URLS"] = triton.grpc_url
    env["CLOUDACH_INFERENCE_LISTEN"] = f"127.0.0.1:{port}"
    with open(logs / "inference_svc.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "inference_svc"], stdout=log, stderr=subprocess.STDOUT, env=env
        )


def stop(process: subprocess.Popen, timeout_s: float = 35) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_stack(state_dir: pathlib.Path, inference_port: int) -> int:
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"starting Triton Inference Server with the CPU model (log: {logs / 'tritonserver.log'})", flush=True)
    triton = start_triton(logs / "tritonserver.log")
    inference = None
    try:
        triton.wait_ready(["tensorrt_llm"], timeout_s=120)
        print(f"  Triton ready: gRPC {triton.grpc_url}, metrics {triton.metrics_url}", flush=True)
        inference = start_inference(triton, inference_port, logs)
        wait_serving(f"127.0.0.1:{inference_port}", 60, inference)
        print(f"  inference_svc ready: gRPC 127.0.0.1:{inference_port} (log: {logs / 'inference_svc.log'})")
        print("Cloudach is up. Ctrl-C stops it.", flush=True)
        asyncio.run(_wait_for_exit(triton, inference))
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping...", flush=True)
        if inference is not None:
            stop(inference)
        triton.stop()


async def _wait_for_exit(triton: TritonServer, inference: subprocess.Popen) -> None:
    from cloudach.rpc.server import wait_for_termination_signal

    signalled = asyncio.create_task(wait_for_termination_signal())
    while not signalled.done():
        if not triton.is_running() or inference.poll() is not None:
            signalled.cancel()
            raise RuntimeError("a service of the stack exited; see the logs under .cloudach/logs")
        await asyncio.sleep(0.5)
