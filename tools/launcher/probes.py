"""Is a service up and ready? One probe for gRPC servers (grpc.health.v1), one for HTTP ones.

Each probe answers True (ready), False (answering, not ready) or None (not answering), for the
launcher waiting on its children and for `cloudach status`.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudach.rpc.tls import TlsSettings

Probe = Callable[[], "bool | None"]
#: ("grpc", address) or ("http", url, ...): a probe that can be written down (the launcher's state file)
ProbeSpec = tuple[str, ...]


def grpc_ready(address: str, timeout_s: float = 1.0) -> bool | None:
    try:
        tls = TlsSettings.from_env()
        channel = (grpc.secure_channel(address, tls.channel_credentials(), options=tls.channel_options())
                   if tls.enabled else grpc.insecure_channel(address))
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except (grpc.RpcError, ValueError, OSError):  # not answering, or TLS settings it cannot use
        return None
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ready(*urls: str, timeout_s: float = 1.0) -> bool | None:
    """True when every url answers 200; False when one answers otherwise; None when one does not answer."""
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                if reply.status != 200:
                    return False
        except urllib.error.HTTPError:
            return False
        except OSError:
            return None
    return True


def check(spec: ProbeSpec) -> bool | None:
    kind, *targets = spec
    return grpc_ready(targets[0]) if kind == "grpc" else http_ready(*targets)


def describe(state: bool | None) -> str:
    return {True: "up, ready", False: "up, not ready", None: "down"}[state]


def wait_ready(probe: Probe, what: str, timeout_s: float, process: subprocess.Popen | None = None,
               cancelled: Callable[[], bool] = lambda: False) -> None:
    """Blocks until probe() is True; raises if the process exits, the time runs out or cancelled()."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not cancelled():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if probe():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s:g}s" if not cancelled() else f"{what}: start cancelled")


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen) -> None:
    wait_ready(lambda: grpc_ready(address), address, timeout_s, process)


def wait_http_ok(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    wait_ready(lambda: http_ready(url), url, timeout_s, process)
