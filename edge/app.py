"""The edge's app factory: routes, middlewares, and the inference_svc channel's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator

from aiohttp import web
from grpc_health.v1.health_pb2_grpc import HealthStub

from cloudach.auth.v1 import auth_pb2
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.inference.v1.inference_pb2_grpc import InferenceServiceStub
from cloudach.db import Database
from cloudach.outbox import ServiceToken, delivering
from cloudach.prices import load_prices
from cloudach.rpc.client import service_channel
from cloudach.telemetry import client_interceptors
from edge import batch_api, chat, completions, health, models, openapi, org_usage, usage
from edge.admission import Admission
from edge.auth import Authenticator
from edge.config import EdgeConfig
from edge.metrics import METRICS, EdgeMetrics, metrics_endpoint
from edge.mux import Multiplexer
from edge.middleware import auth_middleware, common_headers, errors_middleware
from edge.batch_runner import BatchRunner
from edge.batch_store import BatchStore, DirectoryFileStore
from edge.budgets import Budgets, FailoverSpend, InProcessSpend, RedisSpend
from edge.ratelimit import InProcessLimiter
from edge.ratelimit_failover import FailoverLimiter, ShareLimiter
from edge.ratelimit_redis import RedisLimiter, redis_client
from edge.state import STATE, EdgeState
from edge.tracing import record_status, tracing_middleware

async def channels(app: web.Application) -> AsyncIterator[None]:
    """Clients of inference_svc, auth_svc, billing_svc and (when configured) Redis, and the usage
    outbox with its deliverer, for the app's lifetime."""
    state = app[STATE]
    config = state.config
    async with contextlib.AsyncExitStack() as stack:
        opened = [await stack.enter_async_context(service_channel(target, client_interceptors(), config.grpc_keepalive_s))
                  for target in (config.inference_target, config.auth_target, config.billing_target)]
        inference, auth, billing = opened
        state.inference = InferenceServiceStub(inference)
        state.generate = state.inference
        if config.multiplex:
            state.generate = Multiplexer(state.inference, config.mux_streams)
            stack.push_async_callback(state.generate.close)
        state.inference_health = HealthStub(inference)
        state.auth = Authenticator(AuthServiceStub(auth), config.auth_cache_ttl_s, counter=state.metrics.auth_cache,
                                   unknown_lookups_per_minute=config.unknown_key_lookups_per_minute)
        state.billing = BillingServiceStub(billing)
        prices = load_prices(config.prices_file)
        spend: InProcessSpend | FailoverSpend = InProcessSpend()
        if config.redis_url:
            client = redis_client(config.redis_url, config.redis_timeout_s)
            stack.push_async_callback(client.aclose)
            spend = FailoverSpend(RedisSpend(client), spend)
            state.limiter = FailoverLimiter(RedisLimiter(client, config.rate_window_s),
                                            InProcessLimiter(window_s=config.rate_window_s),
                                            replicas=config.edge_replicas, open_s=config.redis_retry_s,
                                            mode_gauge=state.metrics.limiter_mode)
        elif config.edge_replicas > 1:
            state.limiter = ShareLimiter(InProcessLimiter(window_s=config.rate_window_s), config.edge_replicas)
        else:
            state.limiter = InProcessLimiter(window_s=config.rate_window_s)
        state.budgets = Budgets(spend, prices, state.billing)
        identity = service_key = None
        if config.service_key_file:
            service_key = pathlib.Path(config.service_key_file).read_text().strip()
            identity = ServiceToken(AuthServiceStub(auth), service_key)
        state.outbox, state.outbox_wake = await stack.enter_async_context(delivering(
            config.outbox_path, state.billing, identity, config.outbox_max_backoff_s, config.outbox_depth_every_s,
            state.metrics.outbox_depth, state.metrics.outbox_set_aside, config.outbox_flush_s))
        if service_key is not None:
            issuer = ServiceToken(AuthServiceStub(auth), service_key, purpose=auth_pb2.PURPOSE_ADMIN)
            await stack.enter_async_context(batch_jobs(state, issuer, AuthServiceStub(auth)))
        yield

async def stop_batches(app: web.Application) -> None:
    """on_shutdown, as the HTTP drain begins: no batch request starts on a stopping edge."""
    runner = app[STATE].batch_runner
    if runner is not None:
        runner.stop()


@contextlib.asynccontextmanager
async def batch_jobs(state: EdgeState, identity: ServiceToken, auth: AuthServiceStub) -> AsyncIterator[None]:
    """The batch store, and this edge's runner of batch jobs, for the app's lifetime."""
    config = state.config
    db = Database(config.batch_database_url)
    store = BatchStore(db, DirectoryFileStore(config.files_dir))
    try:
        await store.migrate()
        state.batches = store
        runner = BatchRunner(state, store, identity, auth, lease_s=config.batch_lease_s,
                             concurrency=config.batch_concurrency, pause_above=config.batch_pause_above,
                             retry_s=config.batch_retry_s)
        task = asyncio.create_task(runner.run_forever(), name="batch-runner")
        state.batch_runner = runner
        try:
            yield
        finally:
            # The requests running finish, so each is billed whole; past the grace they are cut.
            runner.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(config.shutdown_grace_s, 60.0)):
                    await asyncio.shield(task)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await db.close()


async def metrics_site(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: /metrics on the configured metrics address for the app's lifetime."""
    config = app[STATE].config
    if config.metrics_port < 0:
        yield
        return
    metrics_app = web.Application()
    metrics_app[METRICS] = app[METRICS]
    metrics_app.router.add_get("/metrics", metrics_endpoint)
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.metrics_host, config.metrics_port)
    await site.start()
    try:
        yield
    finally:
        await runner.cleanup()


def create_app(config: EdgeConfig) -> web.Application:
    app = web.Application(
        # The server span is outermost, so it covers authentication and records the final status.
        middlewares=[tracing_middleware, errors_middleware, auth_middleware],
        client_max_size=config.max_body_bytes,
    )
    metrics = EdgeMetrics()
    admission = Admission(config.max_concurrent_requests, metrics.rejections.labels("capacity").inc)
    app[STATE] = EdgeState(config, admission, metrics)
    app[METRICS] = metrics
    app.cleanup_ctx.append(channels)
    app.on_shutdown.append(stop_batches)
    app.cleanup_ctx.append(metrics_site)
    app.on_response_prepare.append(common_headers)
    app.on_response_prepare.append(record_status)
    app.router.add_post("/v1/chat/completions", chat.create_chat_completion)
    app.router.add_post("/v1/completions", completions.create_completion)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/models/{model:.+}", models.retrieve_model)
    app.router.add_get("/v1/usage", usage.get_usage)
    app.router.add_get("/v1/organization/usage/completions", org_usage.completions_usage)
    app.router.add_get("/v1/organization/costs", org_usage.costs)
    batch_api.add_routes(app)
    app.router.add_get("/health", health.health)
    app.router.add_get("/ready", health.ready)
    app.router.add_get("/openapi.json", openapi.openapi_json)
    return app
