"""Who is calling: every /v1 request needs `Authorization: Bearer <key>`, checked by auth_svc.

Answers are cached for a short TTL, keyed by the key's SHA-256, so auth_svc is off the
critical path of most requests: a revoked key stops working within the TTL, and while
auth_svc is down cached keys keep working until their TTL and unknown ones get 503. The
key itself is never stored, logged or echoed.

Unknown keys cost auth_svc a lookup each, so they are bounded: a key of the checksummed format
whose checksum is wrong (a random or mistyped key) is refused here without one, and each client
address may cause only `unknown_lookups_per_minute` lookups that find no key; past that its
uncached keys get 429 until its budget refills.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from cloudach.apikeys import checksum_verdict
from cloudach.auth.v1 import auth_pb2 as pb
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.errors import Unauthenticated
from cloudach.rpc.errors import error_from_rpc
from edge.errors import ApiError, retry_headers, unavailable

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
    #: the internal token to present to inference_svc (good there only)
    token: str
    #: the internal token to read usage from billing_svc with
    usage_token: str = ""
    #: spend budgets in micro-units (0: none): the key's, and its organization's
    budget_daily_micros: int = 0
    budget_monthly_micros: int = 0
    org_budget_daily_micros: int = 0
    org_budget_monthly_micros: int = 0

    @property
    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    @property
    def usage_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.usage_token}"),)


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


def principal_from(reply: pb.AuthenticateResponse) -> Principal:
    p, limits = reply.principal, reply.principal.limits
    return Principal(
        key_id=p.key_id, organization=p.organization, admin=p.admin,
        requests_per_minute=limits.requests_per_minute, tokens_per_minute=limits.tokens_per_minute,
        max_concurrent_streams=limits.max_concurrent_streams, allowed_models=frozenset(limits.allowed_models),
        token=reply.token, usage_token=reply.usage_token,
        budget_daily_micros=limits.budget_daily_micros, budget_monthly_micros=limits.budget_monthly_micros,
        org_budget_daily_micros=p.organization_budget.daily_micros,
        org_budget_monthly_micros=p.organization_budget.monthly_micros,
    )


class LookupBudget:
    """Per client address, a bucket of lookups that found no key: `per_minute` of them, refilled
    continuously. Bounded: the least recently seen addresses are forgotten past max_clients."""

    def __init__(self, per_minute: int, max_clients: int = 100_000) -> None:
        self._unbounded = per_minute <= 0  # 0: no budget, as for the other limits
        self._per_s = max(per_minute, 1) / 60.0
        self._capacity = float(per_minute)
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client: (level, at)

    def _level(self, client: str, now: float) -> float:
        level, at = self._buckets.get(client, (self._capacity, now))
        return min(self._capacity, level + (now - at) * self._per_s)

    def take(self, client: str) -> float:
        """Takes one lookup from the client's budget: 0 when it had one, else how long until it will
        (nothing taken). Taken before the lookup, so concurrent requests cannot overdraw it."""
        if self._unbounded:
            return 0.0
        now = time.monotonic()
        level = self._level(client, now)
        if level < 1:
            return (1 - level) / self._per_s
        self._set(client, level - 1, now)
        return 0.0

    def give_back(self, client: str) -> None:
        """The lookup found a key: it costs the client nothing."""
        if self._unbounded:
            return
        now = time.monotonic()
        self._set(client, min(self._capacity, self._level(client, now) + 1), now)

    def _set(self, client: str, level: float, now: float) -> None:
        self._buckets[client] = (level, now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)


class Authenticator:
    def __init__(self, stub: AuthServiceStub, ttl_s: float, max_entries: int = 100_000, timeout_s: float = 2.0,
                 counter=None, unknown_lookups_per_minute: int = 60) -> None:
        self._stub = stub
        self._budget = LookupBudget(unknown_lookups_per_minute)
        #: a Prometheus counter labelled by result ("hit", "miss"), when given
        self._counter = counter
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._timeout_s = timeout_s
        #: digest -> (expires at, principal or None for a refused key)
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    async def authenticate(self, authorization: str | None, client: str = "") -> Principal:
        """The caller of a request from address client (its budget of unknown-key lookups)."""
        key = bearer_key(authorization)
        if checksum_verdict(key) is False:
            self._count("rejected_locally")
            raise ApiError(401, _INCORRECT, code="invalid_api_key")
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            self._count("hit")
            return self._answer(cached[1])
        wait_s = self._budget.take(client)
        if wait_s:
            self._count("lookup_budget_spent")
            raise ApiError(429, "Too many requests with unknown API keys from your address. Retry shortly.",
                           type="requests", code="rate_limit_exceeded", headers=retry_headers(wait_s))
        self._count("miss")
        try:
            reply = await self._stub.Authenticate(pb.AuthenticateRequest(api_key=key), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as failure:
            if isinstance(error_from_rpc(failure), Unauthenticated):
                self._remember(digest, now + self._ttl_s, None)
                raise ApiError(401, _INCORRECT, code="invalid_api_key") from None
            self._budget.give_back(client)  # not the client's doing
            raise unavailable("Authentication is temporarily unavailable. Please retry shortly.") from None
        self._budget.give_back(client)
        if reply.principal.role == pb.KEY_ROLE_SERVICE:
            # A service's identity is not an API key: it may only report usage, never be used here.
            self._remember(digest, now + self._ttl_s, None)
            raise ApiError(401, _INCORRECT, code="invalid_api_key")
        token_left = reply.token_expires_at.seconds - time.time() - TOKEN_MARGIN_S
        principal = principal_from(reply)
        self._remember(digest, now + max(0.0, min(self._ttl_s, token_left)), principal)
        return principal

    def _count(self, result: str) -> None:
        if self._counter is not None:
            self._counter.labels(result).inc()

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
