"""Tracing set up from the standard OpenTelemetry environment variables, for every service.

OTEL_SERVICE_NAME (default: the service's own name), OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_EXPORTER = otlp | console | none (comma-separated; unset means none, so a laptop
without a collector logs no export errors), OTEL_EXPORTER_OTLP_ENDPOINT / _TRACES_ENDPOINT
(OTLP over HTTP), and the sampler variables OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG,
which the SDK reads itself. OTEL_SDK_DISABLED=true turns it all off.

No span carries an API key or prompt text: spans hold counts, ids, models and timings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from cloudach.rpc.client import metadata_interceptors


def configure_tracing(service_name: str) -> TracerProvider | None:
    """Installs the process's tracer provider; returns it (None when tracing is off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in (n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",")):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name not in ("none", ""):
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
    trace.set_tracer_provider(provider)
    return provider


def _trace_context() -> Iterable[tuple[str, str]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.items()


def client_interceptors() -> list:
    """Pass the current trace context (W3C traceparent) on every outgoing gRPC call.

    (OpenTelemetry's own grpc.aio client interceptor turns a server stream into a generator
    whose span ends only if it is read to exhaustion; this one adds metadata and nothing else.)"""
    return metadata_interceptors(_trace_context)
