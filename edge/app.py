"""The edge's app factory: routes, middlewares, and the inference_svc channel's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import time
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as redis
from aiohttp import web
from grpc_health.v1.health_pb2_grpc import HealthStub

from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.errors import CloudachError
from cloudach.inference.v1.inference_pb2_grpc import InferenceServiceStub
from cloudach.telemetry import client_interceptors
from edge import chat, models, openapi, usage
from edge.metrics import EdgeMetrics, metrics_endpoint
from edge.auth import Authenticator
from edge.billing import ServiceToken, UsageOutbox, deliver_forever
from edge.config import EdgeConfig
from edge.errors import ApiError, from_domain
from edge.http import REQUEST_ID, STARTED, Admission, request_id
from edge.ratelimit import InProcessLimiter
from edge.ratelimit_redis import RedisLimiter
from edge.state import MODEL, PRINCIPAL, RATE_HEADERS, STATE, EdgeState
from edge.tracing import record_status, tracing_middleware

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


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Gives every request an id and turns every error into OpenAI's envelope. Logs no bodies, no keys."""
    request[REQUEST_ID] = request_id(request)
    request[STARTED] = time.monotonic()
    try:
        response = await handler(request)
    except ApiError as error:
        response = _error_response(error, request.get(RATE_HEADERS))
    except CloudachError as error:
        response = _error_response(from_domain(error))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error_response(_from_http_exception(request, exc))
    except Exception:  # noqa: BLE001 - the one place unexpected errors become a 500
        log.exception("unhandled error on %s %s (request %s)", request.method, request.path, request[REQUEST_ID])
        response = _error_response(ApiError(500, "The server had an error while processing your request.", type="server_error"))
    log.info("%s %s %d %.1fms request_id=%s", request.method, request.path, response.status,
             (time.monotonic() - request[STARTED]) * 1000, request[REQUEST_ID])
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[STATE].metrics.requests.labels(route, str(response.status), request.get(MODEL, "")).inc()
    return response


def _error_response(error: ApiError, rate_headers: dict | None = None) -> web.Response:
    return web.Response(status=error.status, body=error.body(), content_type="application/json",
                        headers={**(rate_headers or {}), **error.headers})


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        request[PRINCIPAL] = await request.app[STATE].auth.authenticate(request.headers.get("Authorization"))
    return await handler(request)


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-request-id"] = request.get(REQUEST_ID) or request_id(request)
    for name, value in (request.get(RATE_HEADERS) or {}).items():
        response.headers.setdefault(name, value)
    started = request.get(STARTED)
    if started is not None:
        response.headers["openai-processing-ms"] = str(int((time.monotonic() - started) * 1000))


async def channels(app: web.Application) -> AsyncIterator[None]:
    """Clients of inference_svc, auth_svc, billing_svc and (when configured) Redis, and the usage
    outbox with its deliverer, for the app's lifetime."""
    state = app[STATE]
    config = state.config
    async with contextlib.AsyncExitStack() as stack:
        inference = await stack.enter_async_context(grpc.aio.insecure_channel(config.inference_target, interceptors=client_interceptors()))
        auth = await stack.enter_async_context(grpc.aio.insecure_channel(config.auth_target, interceptors=client_interceptors()))
        billing = await stack.enter_async_context(grpc.aio.insecure_channel(config.billing_target, interceptors=client_interceptors()))
        state.inference = InferenceServiceStub(inference)
        state.inference_health = HealthStub(inference)
        state.auth = Authenticator(AuthServiceStub(auth), config.auth_cache_ttl_s, counter=state.metrics.auth_cache)
        state.billing = BillingServiceStub(billing)
        if config.redis_url:
            client = redis.Redis.from_url(config.redis_url)
            stack.push_async_callback(client.aclose)
            state.limiter = RedisLimiter(client, config.rate_window_s)
        else:
            state.limiter = InProcessLimiter(window_s=config.rate_window_s)
        pathlib.Path(config.outbox_path).parent.mkdir(parents=True, exist_ok=True)
        state.outbox = UsageOutbox(config.outbox_path)
        stack.push_async_callback(state.outbox.close)
        await state.outbox.open()
        identity = None
        if config.service_key_file:
            identity = ServiceToken(AuthServiceStub(auth), pathlib.Path(config.service_key_file).read_text().strip())
        deliverer = asyncio.create_task(deliver_forever(
            state.outbox, state.billing, identity, state.outbox_wake, config.outbox_max_backoff_s,
            depth_gauge=state.metrics.outbox_depth))
        try:
            yield
        finally:
            deliverer.cancel()  # what is not delivered stays in the outbox for the next start
            with contextlib.suppress(asyncio.CancelledError):
                await deliverer


def create_app(config: EdgeConfig) -> web.Application:
    app = web.Application(
        # The server span is outermost, so it covers authentication and records the final status.
        middlewares=[tracing_middleware, errors_middleware, auth_middleware],
        client_max_size=config.max_body_bytes,
    )
    metrics = EdgeMetrics()
    admission = Admission(config.max_concurrent_requests, metrics.rejections.labels("capacity").inc)
    app[STATE] = EdgeState(config, admission, metrics)
    app.cleanup_ctx.append(channels)
    app.on_response_prepare.append(_common_headers)
    app.on_response_prepare.append(record_status)
    app.router.add_post("/v1/chat/completions", chat.create_chat_completion)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/models/{model:.+}", models.retrieve_model)
    app.router.add_get("/v1/usage", usage.get_usage)
    app.router.add_get("/health", models.health)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/ready", models.ready)
    app.router.add_get("/openapi.json", openapi.openapi_json)
    return app
