"""Prometheus metrics and server spans of the gRPC services.

One registry per service (never the global one), served on its metrics port. One interceptor
gives every RPC its server span (child of the caller's trace context) and counts it by method
and status code. The span is made current in the call's own task and never detached: that
task ends with the call, and nothing attaches or detaches a context across a stream's yields.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cloudach.errors import CloudachError
from cloudach.rpc.wrap import wrap_handler

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def serve_metrics(registry: CollectorRegistry, port: int, host: str | None = None) -> int:
    """Serves /metrics on host:port (0 picks a free port) in a daemon thread; returns the port.
    host: by default CLOUDACH_METRICS_HOST, else loopback (in a pod: 0.0.0.0, for Prometheus)."""
    host = host or os.environ.get("CLOUDACH_METRICS_HOST") or "127.0.0.1"
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port


class RpcObservability(grpc.aio.ServerInterceptor):
    """A server span per RPC, and RPC counts by method and status code, duration, in flight."""

    def __init__(self, service: str, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._tracer = trace.get_tracer(f"cloudach.{service}")
        self._requests = Counter(f"cloudach_{service}_rpc_requests_total", "RPCs by method and status code",
                                 ["method", "code"], registry=registry)
        self._seconds = Histogram(f"cloudach_{service}_rpc_duration_seconds", "RPC duration (whole stream)",
                                  ["method"], buckets=LATENCY_BUCKETS, registry=registry)
        self._in_flight = Gauge(f"cloudach_{service}_rpc_in_flight", "RPCs in progress", ["method"], registry=registry)

    def _start(self, full_method: str, method: str, carrier: dict[str, str]) -> trace.Span:
        span = self._tracer.start_span(
            full_method, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.method": method, "rpc.service": full_method.split("/")[1]},
        )
        otel_context.attach(trace.set_span_in_context(span))  # this call's task only; see the docstring
        self._in_flight.labels(method).inc()
        return span

    def _done(self, method: str, started: float, error: BaseException | None, span: trace.Span) -> None:
        if error is None:
            code = "OK"
        elif isinstance(error, CloudachError):
            code = error.status.name
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            code = "CANCELLED"  # the caller went away
        else:
            code = "INTERNAL"
        self._requests.labels(method, code).inc()
        self._seconds.labels(method).observe(time.monotonic() - started)
        self._in_flight.labels(method).dec()
        span.set_attribute("rpc.grpc.status_code", code)
        if code not in ("OK", "CANCELLED"):
            span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        span.end()

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        if handler is None or full_method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler

        def observed(context: Any):
            carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            return self.observing(full_method, carrier)

        return wrap_handler(handler, observed)

    @contextlib.asynccontextmanager
    async def observing(self, full_method: str, carrier: dict[str, str]):
        """One call's span (child of the trace context in carrier) and counts, around the block:
        for an RPC, and for a call another RPC carries (GenerateMany's)."""
        method = full_method.rsplit("/", 1)[-1]
        started, error = time.monotonic(), None
        span = self._start(full_method, method, carrier)
        try:
            yield span
        except BaseException as failure:
            error = failure
            raise
        finally:
            self._done(method, started, error, span)
