"""Wrapping a gRPC method handler: the one way our server interceptors add behaviour to a call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import grpc

Around = Callable[[Any], contextlib.AbstractAsyncContextManager]


def wrap_handler(handler: grpc.RpcMethodHandler | None, around: Around) -> grpc.RpcMethodHandler | None:
    """The handler, with `async with around(context)` entered in the call's own task around its
    behavior (for a server stream, around the whole stream)."""
    if handler is None:
        return None
    serializers = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        behavior = handler.unary_unary

        async def unary(request: Any, context: Any) -> Any:
            async with around(context):
                return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, **serializers)

    def streaming(behavior):  # a server stream: around the whole stream, its request one or many
        async def stream(request: Any, context: Any):
            async with around(context):
                async for response in behavior(request, context):
                    yield response

        return stream

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **serializers)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **serializers)
    raise TypeError("client-streaming handlers are not wrapped: none of our services has one")
