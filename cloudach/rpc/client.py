"""Client-side metadata for every call of a channel (a token, a trace context).

Two interceptor objects, because grpc.aio files each interceptor under one kind of call only.
Only metadata is added: the call object is returned as it is, never wrapped, so streams
behave exactly as they would without the interceptor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import grpc

from cloudach.rpc.tls import TlsSettings

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


#: how often an idle channel checks that its peer is still there
KEEPALIVE_S = 30.0


def keepalive_options(every_s: float = KEEPALIVE_S) -> list[tuple[str, int]]:
    """A channel that pings its peer every every_s seconds (busy or idle) and drops a connection
    unanswered for 10 s more, so a vanished peer (a killed pod, a dropped NAT entry) is noticed
    in seconds instead of at the next call's deadline. Servers accept these pings (cloudach.rpc.server)."""
    return [
        ("grpc.keepalive_time_ms", int(every_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


#: round robin over every address; an inference call that fails UNAVAILABLE before its first
#: message (a replica that died or is draining) is retried on another: gRPC retries a stream only
#: until a response has arrived, so failover never repeats text a caller has seen
#: the retry policy of InferenceService calls (the edge's Multiplexer retries its calls alike)
RETRY_ATTEMPTS, RETRY_FIRST_BACKOFF_S, RETRY_MAX_BACKOFF_S = 3, 0.05, 0.5
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "cloudach.inference.v1.InferenceService"}],
        "retryPolicy": {"maxAttempts": RETRY_ATTEMPTS, "initialBackoff": f"{RETRY_FIRST_BACKOFF_S}s",
                        "maxBackoff": f"{RETRY_MAX_BACKOFF_S}s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
})


def service_channel(target: str, interceptors=(), keepalive_s: float = KEEPALIVE_S,
                    tls: TlsSettings | None = None) -> grpc.aio.Channel:
    """The channel one service keeps to another: keepalive on, with the given interceptors, and
    mutual TLS when it is configured (tls: by default from the environment)."""
    tls = tls if tls is not None else TlsSettings.from_env()
    options = keepalive_options(keepalive_s)
    if target.startswith(("dns:", "ipv4:", "ipv6:")):
        # Every address the name resolves to (a headless Service's pods) or the list names (the
        # local stack's replicas), each call to the next one: streams spread across replicas
        # instead of pinning to the first connection.
        options.append(("grpc.service_config", SERVICE_CONFIG))
    if tls.enabled:
        return grpc.aio.secure_channel(target, tls.channel_credentials(), options=options + tls.channel_options(),
                                       interceptors=list(interceptors))
    return grpc.aio.insecure_channel(target, options=options, interceptors=list(interceptors))
