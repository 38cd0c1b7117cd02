"""The edge's server span per HTTP request, child of the caller's W3C traceparent if it sent one.

Attributes follow the HTTP semantic conventions: method, route template, status; never
headers (the API key is one), the body, or the query string.
"""

from __future__ import annotations

from aiohttp import web
from opentelemetry import propagate, trace

tracer = trace.get_tracer("cloudach.edge")


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def tracing_middleware(request: web.Request, handler) -> web.StreamResponse:
    route = _route(request)
    with tracer.start_as_current_span(
        f"{request.method} {route}",
        context=propagate.extract(request.headers),
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": route, "url.scheme": request.scheme},
    ) as span:
        return await handler(request)


async def record_status(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the status is known (and final) once the response is prepared, even if
    the client then leaves before the handler returns."""
    span = trace.get_current_span()
    span.set_attribute("http.response.status_code", response.status)
    if response.status >= 500:
        span.set_status(trace.Status(trace.StatusCode.ERROR))
