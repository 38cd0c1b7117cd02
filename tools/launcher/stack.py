"""The local stack as supervised processes: Triton with the CPU model, auth_svc, billing_svc,
inference_svc and the edge (what `make run` runs).

Each is started in that order and waited on until ready; one that dies later is restarted with
backoff (supervisor.py). State (SQLite databases, the signing key, the dev API key) lives under
the state directory, logs under its logs/; Ctrl-C or SIGTERM stops everything, in reverse order,
leaving no process behind.
"""

from __future__ import annotations

import pathlib
import secrets
import signal
import sys
from dataclasses import dataclass

from cloudach.launcher.ports import free_ports
from cloudach.launcher.process import spawn
from cloudach.launcher.supervisor import Child, StartError, Supervisor
from cloudach.launcher.triton import CPU_MODEL_REPOSITORY, start_triton

MODEL_NAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Ports:
    edge: int = 8080
    inference: int = 50051
    auth: int = 50052
    billing: int = 50053


def dev_api_key(state_dir: pathlib.Path) -> pathlib.Path:
    """The local stack's API key, made once and kept in a file only its owner can read."""
    path = state_dir / "dev-api-key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text("ck-" + secrets.token_urlsafe(32) + "\n")
    path.chmod(0o600)
    return path


def python_service(name: str, address: str, probe: tuple[str, ...], env: dict[str, str], logs: pathlib.Path) -> Child:
    log = logs / f"{name}.log"
    return Child(name, address, lambda: spawn([sys.executable, "-m", name], log, env), probe, log)


def stack_children(state_dir: pathlib.Path, ports: Ports, model_repository: pathlib.Path = CPU_MODEL_REPOSITORY) -> list[Child]:
    logs = (state_dir / "logs").resolve()
    data = (state_dir / "data").resolve()
    data.mkdir(parents=True, exist_ok=True)
    key_file = dev_api_key(state_dir).resolve()
    # Triton keeps the ports it first got across restarts, so inference_svc finds it again.
    triton_http, triton_grpc, triton_metrics = free_ports(3)
    triton_ready = ("http", f"http://127.0.0.1:{triton_http}/v2/health/ready",
                    f"http://127.0.0.1:{triton_http}/v2/models/tensorrt_llm/ready")
    triton = Child(
        "tritonserver", f"127.0.0.1:{triton_grpc} (gRPC), http://127.0.0.1:{triton_metrics}/metrics",
        lambda: start_triton(logs / "tritonserver.log", model_repository, ports=(triton_http, triton_grpc, triton_metrics)).process,
        triton_ready, logs / "tritonserver.log", start_timeout_s=180, stop_timeout_s=20,
    )
    auth, billing, inference = (f"127.0.0.1:{p}" for p in (ports.auth, ports.billing, ports.inference))
    edge_url = f"http://127.0.0.1:{ports.edge}"
    return [
        triton,
        python_service("auth_svc", auth, ("grpc", auth), {
            "CLOUDACH_AUTH_LISTEN": auth, "CLOUDACH_AUTH_DATABASE_URL": f"sqlite:///{data / 'auth.db'}",
            "CLOUDACH_AUTH_SIGNING_KEY_FILE": str(data / "auth-signing-key.pem"),
            # the dev key becomes an admin key, so `cloudach keys` works against the local stack
            "CLOUDACH_AUTH_BOOTSTRAP_ADMIN_KEY_FILE": str(key_file),
        }, logs),
        python_service("billing_svc", billing, ("grpc", billing), {
            "CLOUDACH_BILLING_LISTEN": billing, "CLOUDACH_AUTH_TARGET": auth,
            "CLOUDACH_BILLING_DATABASE_URL": f"sqlite:///{data / 'billing.db'}",
        }, logs),
        python_service("inference_svc", inference, ("grpc", inference), {
            "CLOUDACH_TRITON_URLS": f"127.0.0.1:{triton_grpc}", "CLOUDACH_INFERENCE_LISTEN": inference,
            "CLOUDACH_AUTH_TARGET": auth,
        }, logs),
        python_service("edge", f"{edge_url}/v1", ("http", f"{edge_url}/ready"), {
            "CLOUDACH_INFERENCE_TARGET": inference, "CLOUDACH_PORT": str(ports.edge),
            "CLOUDACH_AUTH_TARGET": auth, "CLOUDACH_BILLING_TARGET": billing,
            "CLOUDACH_EDGE_OUTBOX_PATH": str(data / "edge-outbox.db"),
            # the local stack's edge reports usage with the dev (admin) key's tokens
            "CLOUDACH_EDGE_SERVICE_KEY_FILE": str(key_file),
        }, logs),
    ]


def run_stack(state_dir: pathlib.Path, ports: Ports) -> int:
    supervisor = Supervisor(stack_children(state_dir, ports), state_dir / "stack.json")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: supervisor.stopping.set())
    key_file = state_dir / "dev-api-key"
    print(f"starting Triton Inference Server with the CPU model, then the services (logs: {state_dir / 'logs'}/)",
          flush=True)
    try:
        supervisor.start_all()
        if supervisor.stopping.is_set():
            return 0
        print(f"""
Cloudach is up.
  base URL: http://127.0.0.1:{ports.edge}/v1
  API key:  {key_file.read_text().strip()}   (also in {key_file})
  model:    {MODEL_NAME}
  logs:     {state_dir / 'logs'}/
  status:   cloudach status
Ctrl-C stops it.""", flush=True)
        supervisor.watch()
        return 0
    except StartError as failure:
        print(f"!! {failure}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("stopping...", flush=True)
        supervisor.stop_all()
        print("stopped.", flush=True)
