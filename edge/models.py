"""GET /v1/models and GET /v1/models/{model}, in OpenAI's shape."""

from __future__ import annotations

from aiohttp import web

from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.errors import MAX_MODEL_ID_CHARS, model_not_found
from edge.state import PRINCIPAL, STATE

LIST_TIMEOUT_S = 5.0


async def _models(request: web.Request, timeout_s: float = LIST_TIMEOUT_S) -> list[pb.ModelInfo]:
    reply = await request.app[STATE].inference.ListModels(
        pb.ListModelsRequest(), timeout=timeout_s, metadata=request[PRINCIPAL].grpc_metadata
    )
    return list(reply.models)


def _model(info: pb.ModelInfo) -> dict:
    return {"id": info.id, "object": "model", "created": info.created_unix_s, "owned_by": info.owned_by}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(m) for m in await _models(request)]})


async def retrieve_model(request: web.Request) -> web.Response:
    wanted = request.match_info["model"]
    if len(wanted) <= MAX_MODEL_ID_CHARS:
        for info in await _models(request):
            if info.id == wanted:
                return web.json_response(_model(info))
    raise model_not_found(wanted)
