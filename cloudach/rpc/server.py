"""The scaffold every Cloudach gRPC service runs in: error interceptor, grpc.health.v1,
server reflection, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloudach.metrics import RpcObservability, serve_metrics
from cloudach.rpc.errors import ErrorInterceptor
from cloudach.rpc.tls import TlsSettings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: Sequence[str]
    #: the port serving this service's Prometheus metrics (None when not served)
    metrics_port: int | None = None

    async def set_serving(self, serving: bool) -> None:
        """Reports every service (and the server as a whole, "") as serving or not."""
        status = SERVING if serving else NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Stops taking new calls and gives the ones in flight grace_s seconds to finish."""
        await self.set_serving(False)
        await self.server.stop(grace_s)


@dataclass
class RunningService:
    """What a service's running_*() context yields: its gRPC server, and where to reach it."""

    grpc: GrpcServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc.port}"


#: Our clients ping every connection (cloudach.rpc.client.keepalive_options), idle or not. gRPC's
#: server default answers the third ping without data in five minutes with GOAWAY too_many_pings,
#: which fails the calls in flight: accept keepalive pings, at any interval.
KEEPALIVE_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
    # Every connection is closed (GOAWAY) after 5 minutes, its streams given up to 11 more to
    # finish (longer than any request may run): clients then reconnect and re-resolve, so pods
    # added behind a headless Service get their share of new calls.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 660_000),
]


async def start_grpc_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, object]] = (),
    serving: bool = True,
    metrics: tuple[str, CollectorRegistry, int | None] | None = None,
    tls: TlsSettings | None = None,
    observability: RpcObservability | None = None,
) -> GrpcServer:
    """Starts a server on address ("host:0" picks a free port) with register()'s services.
    observability: the spans-and-counts interceptor, when the service uses it itself too.

    serving=False starts it NOT_SERVING, for a service whose readiness a watcher decides.
    metrics=(name, registry, port): spans and RPC counts go to registry, served on port
    (0: a free port; None: not served)."""
    # Errors outermost, so failures of the others (a bad token) are mapped too; then the span
    # and counts, which see each call's domain error; then the rest (the token check).
    name, registry = (metrics[0], metrics[1]) if metrics else (service_names[0].split(".")[1], CollectorRegistry())
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(), observability or RpcObservability(name, registry), *interceptors],
        options=[*KEEPALIVE_SERVER_OPTIONS, *options],
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    tls = tls if tls is not None else TlsSettings.from_env()
    port = server.add_secure_port(address, tls.server_credentials()) if tls.enabled else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    metrics_port = serve_metrics(registry, metrics[2]) if metrics and metrics[2] is not None else None
    running = GrpcServer(server, health_servicer, port, tuple(service_names), metrics_port)
    await running.set_serving(serving)
    return running


async def wait_for_termination_signal() -> signal.Signals:
    """Returns when the process gets SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s))
    try:
        return await received
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_service(name: str, running: Callable[[], contextlib.AbstractAsyncContextManager]) -> None:
    """A service's main(): logging, tracing, then serve until SIGTERM or SIGINT and drain."""
    from cloudach.loop import choose_loop
    from cloudach.telemetry import configure_tracing

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    configure_tracing(name)
    log.info("%s on the %s event loop", name, choose_loop())

    async def serve() -> None:
        async with running() as service:
            log.info("%s listening on %s", name, service.address)
            received = await wait_for_termination_signal()
            log.info("%s stopping after %s", name, received.name)

    asyncio.run(serve())
