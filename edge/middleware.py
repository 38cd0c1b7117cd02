"""The edge's middlewares: every request gets an id, a caller (for /v1) and, whatever goes wrong,
OpenAI's error envelope. This is the one place a failure becomes an HTTP error response."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from edge.errors import ApiError, from_failure
from edge.http import REQUEST_ID, STARTED, request_id
from edge.state import MAX_TOKENS_NAME, MODEL, PRINCIPAL, RATE_HEADERS, STATE

log = logging.getLogger("edge.access")


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> ApiError:
    if isinstance(exc, web.HTTPNotFound):
        return ApiError(404, f"Invalid URL ({request.method} {request.path})")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = exc.headers.get("Allow", "")
        return ApiError(405, f"Method {request.method} is not allowed for {request.path}.", headers={"Allow": allow})
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[STATE].config.max_body_bytes
        return ApiError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
    return ApiError(exc.status, exc.reason, type="invalid_request_error" if exc.status < 500 else "server_error")


def _error_response(error: ApiError, rate_headers: dict | None = None) -> web.Response:
    return web.Response(status=error.status, body=error.body(), content_type="application/json",
                        headers={**(rate_headers or {}), **error.headers})


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Gives every request an id and turns every error into OpenAI's envelope. Logs no bodies, no keys."""
    request[REQUEST_ID] = request_id(request)
    request[STARTED] = time.monotonic()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error_response(_from_http_exception(request, exc))
    except Exception as failure:  # noqa: BLE001 - the one place failures become responses
        error = from_failure(failure, request.get(MAX_TOKENS_NAME, "max_tokens"))
        if error is None:
            log.exception("unhandled error on %s %s (request %s)", request.method, request.path, request[REQUEST_ID])
            error = ApiError(500, "The server had an error while processing your request.", type="server_error")
        response = _error_response(error, request.get(RATE_HEADERS))
    log.info("%s %s %d %.1fms request_id=%s", request.method, request.path, response.status,
             (time.monotonic() - request[STARTED]) * 1000, request[REQUEST_ID])
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[STATE].metrics.requests.labels(route, str(response.status), request.get(MODEL, "")).inc()
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        request[PRINCIPAL] = await request.app[STATE].auth.authenticate(request.headers.get("Authorization"),
                                                                        request.remote or "")
    return await handler(request)


async def common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the request's id, its rate-limit headers, the processing time."""
    response.headers["x-request-id"] = request.get(REQUEST_ID) or request_id(request)
    for name, value in (request.get(RATE_HEADERS) or {}).items():
        response.headers.setdefault(name, value)
    started = request.get(STARTED)
    if started is not None:
        response.headers["openai-processing-ms"] = str(int((time.monotonic() - started) * 1000))
