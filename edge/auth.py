"""Who is calling: every /v1 request needs `Authorization: Bearer <key>`, checked by auth_svc.

Answers are cached for a short TTL, keyed by the key's SHA-256, so auth_svc is off the
critical path of most requests: a revoked key stops working within the TTL, and while
auth_svc is down cached keys keep working until their TTL and unknown ones get 503. The
key itself is never stored, logged or echoed.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from cloudach.auth.v1 import auth_pb2 as pb
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.errors import Unauthenticated
from cloudach.rpc.errors import error_from_rpc
from edge.errors import ApiError, unavailable

_MISSING = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_INCORRECT = "Incorrect API key provided. You can find your API keys in your Cloudach dashboard."
#: a token is not used in its last minute of life
TOKEN_MARGIN_S = 60.0


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    organization: str
    admin: bool
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent_streams: int
    allowed_models: frozenset[str]
    #: the internal token to present to inference_svc and billing_svc
    token: str

    @property
    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


#: longer than any key auth_svc issues; a longer one is refused without asking auth_svc
MAX_KEY_CHARS = 256


def bearer_key(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, _MISSING, code="invalid_api_key")
    key = key.strip()
    # Keys are printable ASCII: anything else (a byte that is not UTF-8 arrives as a surrogate
    # escape) cannot be one, and must not reach a hash, a log line or gRPC metadata.
    if len(key) > MAX_KEY_CHARS or not (key.isascii() and key.isprintable()):
        raise ApiError(401, _INCORRECT, code="invalid_api_key")
    return key


def _principal(reply: pb.AuthenticateResponse) -> Principal:
    p, limits = reply.principal, reply.principal.limits
    return Principal(
        key_id=p.key_id, organization=p.organization, admin=p.admin,
        requests_per_minute=limits.requests_per_minute, tokens_per_minute=limits.tokens_per_minute,
        max_concurrent_streams=limits.max_concurrent_streams, allowed_models=frozenset(limits.allowed_models),
        token=reply.token,
    )


class Authenticator:
    def __init__(self, stub: AuthServiceStub, ttl_s: float, max_entries: int = 100_000, timeout_s: float = 2.0,
                 counter=None) -> None:
        self._stub = stub
        #: a Prometheus counter labelled by result ("hit", "miss"), when given
        self._counter = counter
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._timeout_s = timeout_s
        #: digest -> (expires at, principal or None for a refused key)
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    async def authenticate(self, authorization: str | None) -> Principal:
        key = bearer_key(authorization)
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            if self._counter is not None:
                self._counter.labels("hit").inc()
            return self._answer(cached[1])
        if self._counter is not None:
            self._counter.labels("miss").inc()
        try:
            reply = await self._stub.Authenticate(pb.AuthenticateRequest(api_key=key), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as failure:
            if isinstance(error_from_rpc(failure), Unauthenticated):
                self._remember(digest, now + self._ttl_s, None)
                raise ApiError(401, _INCORRECT, code="invalid_api_key") from None
            raise unavailable("Authentication is temporarily unavailable. Please retry shortly.") from None
        token_left = reply.token_expires_at.seconds - time.time() - TOKEN_MARGIN_S
        principal = _principal(reply)
        self._remember(digest, now + max(0.0, min(self._ttl_s, token_left)), principal)
        return principal

    def _remember(self, digest: str, expires: float, principal: Principal | None) -> None:
        self._cache[digest] = (expires, principal)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    @staticmethod
    def _answer(principal: Principal | None) -> Principal:
        if principal is None:
            raise ApiError(401, _INCORRECT, code="invalid_api_key")
        return principal
