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

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter


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


class _TraceContext:
    @staticmethod
    def _details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if not carrier:
            return details
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *carrier.items()))


class _TraceContextUnary(_TraceContext, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _TraceContextStream(_TraceContext, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def client_interceptors() -> list:
    """Pass the current trace context (W3C traceparent) on every outgoing gRPC call.

    Only metadata is added: the call object is returned as it is, never wrapped, so streams
    behave exactly as without tracing. (OpenTelemetry's own grpc.aio client interceptor turns
    a server stream into a generator whose span ends only if it is read to exhaustion.)"""
    return [_TraceContextUnary(), _TraceContextStream()]
