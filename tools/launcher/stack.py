"""The local stack as supervised processes: Triton with the CPU model, auth_svc, billing_svc,
inference_svc and the edge (what `make run` runs).

Every port is checked before anything starts. Each process is then started in that order and
waited on until ready; one that dies later is restarted with backoff (supervisor.py). Each child
gets its settings passed explicitly, on top of this process's environment. State (SQLite
databases, the signing key, the dev API key) lives under the state directory, logs under its
logs/; Ctrl-C or SIGTERM stops everything, in reverse order, leaving no process behind.
"""

from __future__ import annotations

import pathlib
import signal
import sys
from collections.abc import Mapping

from cloudach import defaults as d
from cloudach.apikeys import new_api_key
from tools.launcher.ports import free_ports, port_taken
from tools.launcher.process import spawn
from tools.launcher.supervisor import Child, StartError, Supervisor
from tools.launcher.triton import CPU_MODEL_REPOSITORY, start_triton, stub_died
from tools.settings import StackSettings, variable

MODEL_NAME = "smollm2-135m-instruct"
#: what binds each port setting, and its command-line option where it has one
PORT_USERS = {
    "port": ("the HTTP API", "--port"), "inference_port": ("inference_svc", "--inference-port"),
    "auth_port": ("auth_svc", "--auth-port"), "billing_port": ("billing_svc", "--billing-port"),
    "edge_metrics_port": ("the edge's metrics", None), "inference_metrics_port": ("inference_svc's metrics", None), "auth_metrics_port": ("auth_svc's metrics", None),
    "billing_metrics_port": ("billing_svc's metrics", None),
}


def dev_api_key(state_dir: pathlib.Path, name: str = "dev-api-key") -> pathlib.Path:
    """The local stack's API key (or a service's key: name), made once and kept in a file only
    its owner can read."""
    path = state_dir / name
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(new_api_key() + "\n")
    path.chmod(0o600)
    return path


def taken_ports(settings: StackSettings) -> list[str]:
    """One line for each port the stack would bind that something else holds, naming what to change."""
    lines = []
    for name, port in settings.ports().items():
        if port_taken(port):
            user, option = PORT_USERS[name]
            how = " or ".join(filter(None, (option, variable(StackSettings, name))))
            lines.append(f"port {port} ({user}) is already in use on {d.HOST}: choose another with {how}")
    return lines


#: the Python services, each run as `python -m <name>` (here, and in the services image)
PYTHON_SERVICES = ("auth_svc", "billing_svc", "inference_svc", "edge")


def service_argv(name: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", name]


def python_service(name: str, address: str, probe: tuple[str, ...], env: dict[str, str], logs: pathlib.Path) -> Child:
    log = logs / f"{name}.log"
    return Child(name, address, lambda: spawn(service_argv(name), log, env), probe, log)


def stack_children(state_dir: pathlib.Path, settings: StackSettings,
                   model_repository: pathlib.Path = CPU_MODEL_REPOSITORY, env: Mapping[str, str] = {}) -> list[Child]:
    """The stack's processes, each with its settings; env is added to every child's environment."""
    logs = (state_dir / "logs").resolve()
    data = (state_dir / "data").resolve()
    data.mkdir(parents=True, exist_ok=True)
    key_file = dev_api_key(state_dir).resolve()
    # The services' own identities: service keys, good for reporting usage and nothing else.
    edge_key, inference_key = (dev_api_key(state_dir, f"{name}-service-key").resolve() for name in ("edge", "inference"))
    # Triton keeps the ports it first got across restarts, so inference_svc finds it again. None
    # of the stack's own ports: those are free now, but their servers start after Triton.
    triton_http, triton_grpc, triton_metrics = free_ports(3, avoid=settings.ports().values())
    triton_ready = ("http", f"http://{d.HOST}:{triton_http}/v2/health/ready",
                    f"http://{d.HOST}:{triton_http}/v2/models/tensorrt_llm/ready")
    triton = Child(
        "tritonserver", f"{d.HOST}:{triton_grpc} (gRPC), http://{d.HOST}:{triton_metrics}/metrics",
        lambda: start_triton(logs / "tritonserver.log", model_repository, ports=(triton_http, triton_grpc, triton_metrics),
                             trace_url=settings.triton_trace_url, env=env).process,
        triton_ready, logs / "tritonserver.log", start_timeout_s=180, stop_timeout_s=20, broken=stub_died,
    )
    auth, billing, inference = (d.address(p) for p in (settings.auth_port, settings.billing_port, settings.inference_port))
    edge_url = f"http://{d.address(settings.port)}"
    return [
        triton,
        python_service("auth_svc", auth, ("grpc", auth), {
            **env, "CLOUDACH_AUTH_LISTEN": auth, "CLOUDACH_AUTH_METRICS_PORT": str(settings.auth_metrics_port),
            "CLOUDACH_AUTH_DATABASE_URL": f"sqlite:///{data / d.AUTH_DATABASE}",
            "CLOUDACH_AUTH_SIGNING_KEY_FILE": str(data / d.AUTH_SIGNING_KEY),
            # the dev key becomes an admin key, so `cloudach keys` works against the local stack
            "CLOUDACH_AUTH_BOOTSTRAP_ADMIN_KEY_FILE": str(key_file),
            "CLOUDACH_AUTH_BOOTSTRAP_SERVICE_KEY_FILES": f"{edge_key},{inference_key}",
        }, logs),
        python_service("billing_svc", billing, ("grpc", billing), {
            **env, "CLOUDACH_BILLING_LISTEN": billing, "CLOUDACH_AUTH_TARGET": auth,
            "CLOUDACH_BILLING_METRICS_PORT": str(settings.billing_metrics_port),
            "CLOUDACH_BILLING_DATABASE_URL": f"sqlite:///{data / d.BILLING_DATABASE}",
        }, logs),
        python_service("inference_svc", inference, ("grpc", inference), {
            **env, "CLOUDACH_TRITON_URLS": f"{d.HOST}:{triton_grpc}", "CLOUDACH_INFERENCE_LISTEN": inference,
            "CLOUDACH_INFERENCE_METRICS_PORT": str(settings.inference_metrics_port), "CLOUDACH_AUTH_TARGET": auth,
            "CLOUDACH_INFERENCE_BILLING_TARGET": billing, "CLOUDACH_INFERENCE_OUTBOX_PATH": str(data / d.INFERENCE_OUTBOX),
            "CLOUDACH_INFERENCE_SERVICE_KEY_FILE": str(inference_key),
        }, logs),
        python_service("edge", f"{edge_url}/v1", ("http", f"{edge_url}/ready"), {
            **env, "CLOUDACH_PORT": str(settings.port), "CLOUDACH_EDGE_METRICS_PORT": str(settings.edge_metrics_port),
            "CLOUDACH_INFERENCE_TARGET": inference, "CLOUDACH_AUTH_TARGET": auth, "CLOUDACH_BILLING_TARGET": billing,
            "CLOUDACH_EDGE_OUTBOX_PATH": str(data / d.EDGE_OUTBOX),
            "CLOUDACH_EDGE_SERVICE_KEY_FILE": str(edge_key),
        }, logs),
    ]


def run_stack(state_dir: pathlib.Path, settings: StackSettings) -> int:
    taken = taken_ports(settings)
    if taken:
        print("\n".join(f"!! {line}" for line in taken), file=sys.stderr, flush=True)
        return 1
    supervisor = Supervisor(stack_children(state_dir, settings), state_dir / "stack.json")
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
  base URL: http://{d.address(settings.port)}/v1
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
