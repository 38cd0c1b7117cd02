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
    for port in edge_ports(settings)[1:]:
        if port_taken(port):
            lines.append(f"port {port} (another edge replica's HTTP API) is already in use on {d.HOST}: "
                         "choose another --port (replicas take the ports after it)")
    return lines


#: the Python services, each run as `python -m <name>` (here, and in the services image)
PYTHON_SERVICES = ("auth_svc", "billing_svc", "inference_svc", "edge")


def service_argv(name: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", name]


def python_service(name: str, address: str, probe: tuple[str, ...], env: dict[str, str], logs: pathlib.Path,
                   module: str | None = None) -> Child:
    log = logs / f"{name}.log"
    return Child(name, address, lambda: spawn(service_argv(module or name), log, env), probe, log)


def _named(name: str, i: int, replicas: int) -> str:
    """A replica's name: the service's own with one replica ("edge"), numbered with more ("edge-2")."""
    return name if replicas == 1 else f"{name}-{i + 1}"


def _targets(addresses: list[str]) -> str:
    """A gRPC target for every replica: one address, or an ipv4: list balanced per call."""
    return addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)


def edge_ports(settings: StackSettings) -> list[int]:
    """The HTTP API's port of each edge replica: the configured one, then the next ones up."""
    return [settings.port + i for i in range(settings.replicas)]


def stack_children(state_dir: pathlib.Path, settings: StackSettings,
                   model_repository: pathlib.Path = CPU_MODEL_REPOSITORY, env: Mapping[str, str] = {}) -> list[Child]:
    """The stack's processes, each with its settings; env is added to every child's environment.
    With settings.replicas > 1, that many of each (Tritons included), sharing settings.database_url
    (else the SQLite files) and settings.redis_url, as a cluster's replicas would; with
    settings.edge_workers > 1, that many edge processes behind each edge port (SO_REUSEPORT),
    each with its own outbox."""
    logs = (state_dir / "logs").resolve()
    data = (state_dir / "data").resolve()
    data.mkdir(parents=True, exist_ok=True)
    key_file = dev_api_key(state_dir).resolve()
    # The services' own identities: service keys, good for reporting usage and nothing else.
    edge_key, inference_key = (dev_api_key(state_dir, f"{name}-service-key").resolve() for name in ("edge", "inference"))
    n = settings.replicas
    # Triton keeps the ports it first got across restarts, so inference_svc finds it again. None
    # of the stack's own ports: those are free now, but their servers start after Triton. Other
    # replicas of the services get free ports too (the first keeps the configured ones).
    avoid = [*settings.ports().values(), *edge_ports(settings)]
    edges = n * settings.edge_workers  # edge processes: workers of one replica share its port
    spare = iter(free_ports(3 * n + 3 * (n - 1) + 3 * (n - 1) + edges - 1, avoid=avoid))
    tritons = [tuple(next(spare) for _ in range(3)) for _ in range(n)]
    grpc_ports = {service: [first, *(next(spare) for _ in range(n - 1))] for service, first in
                  (("auth", settings.auth_port), ("billing", settings.billing_port), ("inference", settings.inference_port))}
    auths, billings, inferences = ([d.address(port) for port in grpc_ports[s]] for s in ("auth", "billing", "inference"))
    auth, billing, inference = _targets(auths), _targets(billings), _targets(inferences)
    auth_db = settings.database_url or f"sqlite:///{data / d.AUTH_DATABASE}"
    billing_db = settings.database_url or f"sqlite:///{data / d.BILLING_DATABASE}"

    # Other replicas' metrics ports are chosen now too: a port 0 bound later could take one
    # handed out above to a server that has not started yet.
    replica_metrics = {service: [next(spare) for _ in range((edges if service == "edge" else n) - 1)]
                       for service in ("auth", "billing", "inference", "edge")}

    def metrics(port: int, i: int, service: str) -> str:
        return str(port if i == 0 or port < 0 else replica_metrics[service][i - 1])

    def suffix(name: str, i: int) -> str:  # a replica's own file
        return name if n == 1 else name.replace(".db", f"-{i + 1}.db")

    children: list[Child] = []
    for i, (http, grpc_port, metrics_port) in enumerate(tritons):
        name = _named("tritonserver", i, n)
        children.append(Child(
            name, f"{d.HOST}:{grpc_port} (gRPC), http://{d.HOST}:{metrics_port}/metrics",
            lambda name=name, ports=(http, grpc_port, metrics_port): start_triton(
                logs / f"{name}.log", model_repository, ports=ports, trace_url=settings.triton_trace_url, env=env).process,
            ("http", f"http://{d.HOST}:{http}/v2/health/ready", f"http://{d.HOST}:{http}/v2/models/tensorrt_llm/ready"),
            logs / f"{name}.log", start_timeout_s=180, stop_timeout_s=20, broken=stub_died,
        ))
    triton_urls = ",".join(f"{d.HOST}:{grpc_port}" for _, grpc_port, _ in tritons)
    for i, address in enumerate(auths):
        children.append(python_service(_named("auth_svc", i, n), address, ("grpc", address), {
            **env, "CLOUDACH_AUTH_LISTEN": address, "CLOUDACH_AUTH_METRICS_PORT": metrics(settings.auth_metrics_port, i, "auth"),
            "CLOUDACH_AUTH_DATABASE_URL": auth_db,
            "CLOUDACH_AUTH_SIGNING_KEY_FILE": str(data / d.AUTH_SIGNING_KEY),  # one key: any replica's tokens verify
            # the dev key becomes an admin key, so `cloudach keys` works against the local stack
            "CLOUDACH_AUTH_BOOTSTRAP_ADMIN_KEY_FILE": str(key_file),
            "CLOUDACH_AUTH_BOOTSTRAP_SERVICE_KEY_FILES": f"{edge_key},{inference_key}",
        }, logs, "auth_svc"))
    for i, address in enumerate(billings):
        children.append(python_service(_named("billing_svc", i, n), address, ("grpc", address), {
            **env, "CLOUDACH_BILLING_LISTEN": address, "CLOUDACH_AUTH_TARGET": auth,
            "CLOUDACH_BILLING_METRICS_PORT": metrics(settings.billing_metrics_port, i, "billing"),
            "CLOUDACH_BILLING_DATABASE_URL": billing_db,
        }, logs, "billing_svc"))
    for i, address in enumerate(inferences):
        children.append(python_service(_named("inference_svc", i, n), address, ("grpc", address), {
            **env, "CLOUDACH_TRITON_URLS": triton_urls, "CLOUDACH_INFERENCE_LISTEN": address,
            "CLOUDACH_INFERENCE_METRICS_PORT": metrics(settings.inference_metrics_port, i, "inference"), "CLOUDACH_AUTH_TARGET": auth,
            "CLOUDACH_INFERENCE_BILLING_TARGET": billing,
            "CLOUDACH_INFERENCE_OUTBOX_PATH": str(data / suffix(d.INFERENCE_OUTBOX, i)),
            "CLOUDACH_INFERENCE_SERVICE_KEY_FILE": str(inference_key),
        }, logs, "inference_svc"))
    workers = settings.edge_workers
    # The edges that share each key's limits: every one, through Redis; without it, the workers
    # behind one port (the kernel spreads connections among them), each enforcing its share.
    shared = ({"CLOUDACH_REDIS_URL": settings.redis_url, "CLOUDACH_EDGE_REPLICAS": str(edges)} if settings.redis_url
              else {"CLOUDACH_EDGE_REPLICAS": str(workers)} if workers > 1 else {})
    for i, port in enumerate(edge_ports(settings)):
        url = f"http://{d.address(port)}"
        for w in range(workers):
            name = _named("edge", i, n) + (f"-w{w + 1}" if workers > 1 else "")
            outbox = suffix(d.EDGE_OUTBOX, i).replace(".db", f"-w{w + 1}.db") if workers > 1 else suffix(d.EDGE_OUTBOX, i)
            children.append(python_service(name, f"{url}/v1", ("http", f"{url}/ready"), {
                **env, "CLOUDACH_PORT": str(port),
                "CLOUDACH_EDGE_METRICS_PORT": metrics(settings.edge_metrics_port, i * workers + w, "edge"),
                "CLOUDACH_INFERENCE_TARGET": inference, "CLOUDACH_AUTH_TARGET": auth, "CLOUDACH_BILLING_TARGET": billing,
                "CLOUDACH_EDGE_OUTBOX_PATH": str(data / outbox), "CLOUDACH_EDGE_SERVICE_KEY_FILE": str(edge_key),
                # every edge of the stack shares the batch jobs (SQLite here; PostgreSQL across hosts)
                "CLOUDACH_EDGE_BATCH_DATABASE_URL": f"sqlite:///{data / 'batches.db'}",
                "CLOUDACH_EDGE_FILES_DIR": str(data / "files"),
                **({"CLOUDACH_EDGE_REUSE_PORT": "1"} if workers > 1 else {}), **shared,
            }, logs, "edge"))
    return children


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
  base URL: {", ".join(f"http://{d.address(port)}/v1" for port in edge_ports(settings))}
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
