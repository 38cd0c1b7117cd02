"""Client-side metadata for every call of a channel (a token, a trace context).

Two interceptor objects, because grpc.aio files each interceptor under one kind of call only.
Only metadata is added: the call object is returned as it is, never wrapped, so streams
behave exactly as they would without the interceptor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc

MetadataSource = Callable[[], Iterable[tuple[str, str]]]


class _Appending:
    def __init__(self, source: MetadataSource) -> None:
        self._source = source

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        extra = tuple(self._source())
        if not extra:
            return details
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), *extra))


class _AppendingUnary(_Appending, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AppendingStream(_Appending, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def metadata_interceptors(source: MetadataSource) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding source()'s (key, value) pairs to every unary and server-streaming call."""
    return [_AppendingUnary(source), _AppendingStream(source)]
