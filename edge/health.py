"""GET /health (the process answers) and GET /ready (a model is ready behind it), for load
balancers and Kubernetes probes: no key needed, no body logged."""

from __future__ import annotations

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2

from edge.state import STATE


async def health(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready: inference_svc answers its health check, which it passes only with a model ready in Triton."""
    try:
        reply = await request.app[STATE].inference_health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
    except grpc.aio.AioRpcError as error:
        return web.json_response({"status": "unavailable", "reason": error.code().name}, status=503)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return web.json_response({"status": "no model ready"}, status=503)
    # Which limits are in force: shared by every replica (Redis) or this one's own (Redis down).
    mode = getattr(request.app[STATE].limiter, "mode", "local")
    return web.json_response({"status": "ready", "rate_limits": mode})
