"""GET /v1/models and GET /v1/models/{model}, in OpenAI's shape; GET /ready."""

from __future__ import annotations

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2

from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.rpc.errors import error_from_rpc
from edge.errors import ApiError, from_domain
from edge.state import PRINCIPAL, STATE

LIST_TIMEOUT_S = 5.0


async def _models(request: web.Request, timeout_s: float = LIST_TIMEOUT_S) -> list[pb.ModelInfo]:
    try:
        reply = await request.app[STATE].inference.ListModels(
            pb.ListModelsRequest(), timeout=timeout_s, metadata=request[PRINCIPAL].grpc_metadata
        )
    except grpc.aio.AioRpcError as failure:
        raise from_domain(error_from_rpc(failure)) from None
    return list(reply.models)


def _model(info: pb.ModelInfo) -> dict:
    return {"id": info.id, "object": "model", "created": info.created_unix_s, "owned_by": info.owned_by}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(m) for m in await _models(request)]})


async def retrieve_model(request: web.Request) -> web.Response:
    wanted = request.match_info["model"]
    for info in await _models(request):
        if info.id == wanted:
            return web.json_response(_model(info))
    raise ApiError(404, f"The model `{wanted}` does not exist or you do not have access to it.", code="model_not_found")


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
    return web.json_response({"status": "ready"})
