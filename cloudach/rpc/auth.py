"""The internal-token policy of every gRPC service but auth_svc's public RPCs.

A call must carry `authorization: Bearer <jwt>` signed by auth_svc; its claims are then
available to the handler as `caller()`. Health checks and reflection stay open.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from cloudach.errors import Unauthenticated
from cloudach.tokens import TokenVerifier

_CALLER: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("caller", default=None)
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def caller() -> dict[str, Any]:
    """The verified claims of the current call's token."""
    claims = _CALLER.get()
    if claims is None:
        raise Unauthenticated("no verified caller")
    return claims


def bearer(metadata: Sequence[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
    raise Unauthenticated("missing bearer token")


def with_preamble(handler: grpc.RpcMethodHandler, preamble: Callable[[Any], Awaitable[None]]) -> grpc.RpcMethodHandler:
    """The handler, running `await preamble(context)` in the call's own task before its behavior."""
    serializers = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        behavior = handler.unary_unary

        async def unary(request, context):
            await preamble(context)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **serializers)
    if handler.unary_stream:
        stream_behavior = handler.unary_stream

        async def stream(request, context):
            await preamble(context)
            async for response in stream_behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(stream, **serializers)
    return handler


class TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, verifier: TokenVerifier, open_methods: Sequence[str] = ()) -> None:
        self._verifier = verifier
        self._open = tuple(open_methods)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES) or method in self._open:
            return handler

        async def verify(context) -> None:
            claims = await self._verifier.verify(bearer(context.invocation_metadata()))
            _CALLER.set(claims)

        return with_preamble(handler, verify)


def auth_jwks_fetcher(channel: grpc.aio.Channel) -> Callable[[], Awaitable[dict]]:
    """Fetches auth_svc's published signing keys over the given channel."""
    import json

    from cloudach.auth.v1 import auth_pb2, auth_pb2_grpc

    stub = auth_pb2_grpc.AuthServiceStub(channel)

    async def fetch() -> dict:
        reply = await stub.GetSigningKeys(auth_pb2.GetSigningKeysRequest(), timeout=5)
        return json.loads(reply.jwks_json)

    return fetch


class _Bearer:
    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), self._entry))


class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client side: attach `authorization: Bearer <token>` to every call of a channel.

    Two objects, because grpc.aio files each interceptor under one kind of call only."""
    return [_BearerUnary(token), _BearerStream(token)]
