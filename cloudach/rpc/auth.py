"""The internal-token policy of every gRPC service but auth_svc's public RPCs.

A call must carry `authorization: Bearer <jwt>` signed by auth_svc for this service's audience;
its claims are then available to the handler as `caller()`, and `require(scope)` refuses a caller
whose token lacks the scope the RPC needs. Health checks and reflection stay open.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from cloudach.errors import PermissionDenied, Unauthenticated
from cloudach.rpc.wrap import wrap_handler
from cloudach.tokens import TokenVerifier

_CALLER: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("caller", default=None)
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def caller() -> dict[str, Any]:
    """The verified claims of the current call's token."""
    claims = _CALLER.get()
    if claims is None:
        raise Unauthenticated("no verified caller")
    return claims


def acting_as(claims: dict[str, Any]) -> None:
    """Makes claims the current task's caller: a call carried inside another (GenerateMany's),
    whose token was verified by the carrier."""
    _CALLER.set(claims)


def scopes(claims: dict[str, Any]) -> frozenset[str]:
    scope = claims.get("scope")
    return frozenset(scope.split()) if isinstance(scope, str) else frozenset()


def require(scope: str) -> dict[str, Any]:
    """The current caller's claims, when its token carries scope; else PERMISSION_DENIED."""
    claims = caller()
    if scope not in scopes(claims):
        raise PermissionDenied(f"this call needs the {scope} scope", code="insufficient_scope")
    return claims


def bearer(metadata: Sequence[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
    raise Unauthenticated("missing bearer token")


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Verifies every call's token for audience (the service's own), but the open methods'."""

    def __init__(self, verifier: TokenVerifier, audience: str, open_methods: Sequence[str] = ()) -> None:
        self._verifier = verifier
        self._audience = audience
        self._open = tuple(open_methods)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES) or method in self._open:
            return handler

        @contextlib.asynccontextmanager
        async def verified(context):
            _CALLER.set(await self._verifier.verify(bearer(context.invocation_metadata()), self._audience))
            yield

        return wrap_handler(handler, verified)


def auth_jwks_fetcher(channel: grpc.aio.Channel) -> Callable[[], Awaitable[dict]]:
    """Fetches auth_svc's published signing keys over the given channel."""
    import json

    from cloudach.auth.v1 import auth_pb2, auth_pb2_grpc

    stub = auth_pb2_grpc.AuthServiceStub(channel)

    async def fetch() -> dict:
        reply = await stub.GetSigningKeys(auth_pb2.GetSigningKeysRequest(), timeout=5)
        return json.loads(reply.jwks_json)

    return fetch


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client side: attach `authorization: Bearer <token>` to every call of a channel."""
    from cloudach.rpc.client import metadata_interceptors

    entry = (("authorization", f"Bearer {token}"),)
    return metadata_interceptors(lambda: entry)
