"""GET /openapi.json: the API described from edge.schema, the schemas that validate requests."""

from __future__ import annotations

from aiohttp import web

from edge import schema

_ERRORS = {
    "400": "Invalid request: `param` names the field.",
    "401": "Missing or invalid API key.",
    "404": "Unknown model or URL.",
    "405": "Method not allowed.",
    "413": "Request body too large.",
    "415": "Content type is not application/json.",
    "429": "Rate limited: see Retry-After.",
    "503": "At capacity or the model is unavailable: see Retry-After.",
    "504": "The request's deadline passed.",
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _responses(ok: dict) -> dict:
    errors = {code: {"description": text, "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
              for code, text in _ERRORS.items()}
    return {"200": ok, **errors}


def document() -> dict:
    chat_ok = {
        "description": "A chat.completion object, or with `stream: true` Server-Sent Events whose `data:` "
                       "payloads are chat.completion.chunk objects, ending with `data: [DONE]`.",
        "content": {
            "application/json": {"schema": _ref("CreateChatCompletionResponse")},
            "text/event-stream": {"schema": _ref("CreateChatCompletionStreamResponse")},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cloudach API", "version": "1.0.0",
                 "description": "OpenAI-compatible chat and legacy completions, streamed as Server-Sent Events."},
        "servers": [{"url": "/"}],
        "security": [{"ApiKeyAuth": []}],
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CreateChatCompletionRequest")}}},
                "responses": _responses(chat_ok),
            }},
            "/v1/completions": {"post": {
                "operationId": "createCompletion",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("CreateCompletionRequest")}}},
                "responses": _responses({
                    "description": "A text_completion object, or with `stream: true` Server-Sent Events whose "
                                   "`data:` payloads are text_completion objects, ending with `data: [DONE]`.",
                    "content": {"application/json": {"schema": _ref("CreateCompletionResponse")},
                                "text/event-stream": {"schema": _ref("CreateCompletionResponse")}},
                }),
            }},
            "/v1/models": {"get": {
                "operationId": "listModels",
                "responses": _responses({"description": "The models", "content": {"application/json": {"schema": _ref("ListModelsResponse")}}}),
            }},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _responses({"description": "The model", "content": {"application/json": {"schema": _ref("Model")}}}),
            }},
        },
        "components": {
            "securitySchemes": {"ApiKeyAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "CreateChatCompletionRequest": schema.CREATE_CHAT_COMPLETION_REQUEST,
                "CreateChatCompletionResponse": schema.CHAT_COMPLETION,
                "CreateChatCompletionStreamResponse": schema.CHAT_COMPLETION_CHUNK,
                "CreateCompletionRequest": schema.CREATE_COMPLETION_REQUEST,
                "CreateCompletionResponse": schema.TEXT_COMPLETION,
                "Model": schema.MODEL,
                "ListModelsResponse": schema.MODEL_LIST,
                "ErrorResponse": schema.ERROR_RESPONSE,
            },
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document())
