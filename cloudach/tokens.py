"""Short-lived internal tokens: auth_svc signs them (EdDSA), every other service verifies them
locally against auth_svc's published keys (a JWKS), refetched when an unknown `kid` appears and
whenever the copy is older than a maximum age (so a withdrawn key stops being trusted), with a
small clock leeway (a host a few seconds behind still accepts fresh tokens).

Only EdDSA is accepted: `alg: none`, HS256 signed with the public key and every other
algorithm are refused before any key is used.

A token is good for one service (its audience) and carries scopes (space-separated, as in OAuth):
a service accepts only its own audience, and each RPC asks for its scope (cloudach.rpc.auth). What
each key role gets is auth_svc's decision (auth_svc.roles).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import pathlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloudach.config import from_env, setting
from cloudach.errors import Unauthenticated, Unavailable

ALGORITHM = "EdDSA"
ISSUER = "cloudach-auth"
#: verified tokens remembered (TokenVerifier): a service sees a few callers' tokens at a time
MAX_VERIFIED = 4096
#: the audiences: one per service that verifies tokens
INFERENCE_AUDIENCE = "cloudach-inference"
BILLING_AUDIENCE = "cloudach-billing"
AUTH_AUDIENCE = "cloudach-auth"
#: the scopes
INFERENCE = "inference"  # InferenceService
USAGE_READ = "usage:read"  # GetUsage of the token's own organization
USAGE_WRITE = "usage:write"  # RecordUsage: service identities only
KEYS_ADMIN = "keys:admin"  # the admin RPCs, for the token's own organization
TOKENS_ISSUE = "tokens:issue"  # IssueKeyToken: a service running a key's batch job (service identities only)
ALL_ORGANIZATIONS = "platform"  # with usage:read or keys:admin: any organization


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: Ed25519PublicKey) -> dict[str, str]:
    """The key as a JWK, its kid the RFC 7638 thumbprint (so the same key always has the same kid)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)}
    kid = _b64(hashlib.sha256(json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()).digest())
    return {**jwk, "kid": kid, "alg": ALGORITHM, "use": "sig"}


def load_or_create_private_key(path: pathlib.Path) -> Ed25519PrivateKey:
    """The signing key in a PEM file, made (readable by its owner only) when missing."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return key


class TokenSigner:
    def __init__(self, key: Ed25519PrivateKey, ttl_s: float, extra_public_keys: Sequence[Ed25519PublicKey] = ()) -> None:
        self._key = key
        self._ttl_s = ttl_s
        self._jwk = public_jwk(key.public_key())
        # Keys retired from signing stay published until the tokens they signed have expired.
        self._published = [self._jwk, *(public_jwk(k) for k in extra_public_keys)]

    @property
    def kid(self) -> str:
        return self._jwk["kid"]

    def sign(self, subject: str, claims: dict[str, Any], audience: str | Sequence[str],
             scopes: Sequence[str]) -> tuple[str, int]:
        """A token for subject, good for audience with scopes; returns it and its expiry (unix s)."""
        now = int(time.time())
        exp = now + int(self._ttl_s)
        payload = {**claims, "sub": subject, "iss": ISSUER, "aud": audience if isinstance(audience, str) else list(audience),
                   "scope": " ".join(scopes), "iat": now, "exp": exp}
        return jwt.encode(payload, self._key, algorithm=ALGORITHM, headers={"kid": self.kid}), exp

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": list(self._published)}


@dataclass(frozen=True)
class VerifierSettings:
    """How every service verifies internal tokens (the same variables for all)."""

    #: clocks this far apart still agree on a token's iat and exp
    leeway_s: float = setting(30.0, "CLOUDACH_TOKEN_LEEWAY_S")
    #: the signing keys are refetched once their copy is this old (a withdrawn key's last day)
    jwks_max_age_s: float = setting(300.0, "CLOUDACH_JWKS_MAX_AGE_S")

    @classmethod
    def from_env(cls) -> VerifierSettings:
        return from_env(cls)


class TokenVerifier:
    """Verifies tokens with cached public keys; an unknown kid, or a copy older than max_age_s,
    triggers a refetch (rate-limited: at most one per min_refetch_s)."""

    def __init__(self, fetch_jwks: Callable[[], Awaitable[dict]], min_refetch_s: float = 5.0,
                 settings: VerifierSettings | None = None) -> None:
        self._fetch = fetch_jwks
        self._keys: dict[str, Any] = {}
        self._fetched_at = self._tried_at = float("-inf")
        self._min_refetch_s = min_refetch_s
        self._settings = settings or VerifierSettings.from_env()
        #: one fetch at a time: calls arriving meanwhile wait for it instead of failing
        self._fetching = asyncio.Lock()
        #: (token, audience) -> claims of tokens verified already: a service's callers present
        #: the same token on every call until it is renewed, and a check costs ~100 µs of CPU.
        #: Emptied whenever the signing keys change; an entry is used only until its token expires.
        self._verified: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    def _wants(self, kid: str) -> bool:
        now = time.monotonic()
        stale = now - self._fetched_at >= self._settings.jwks_max_age_s
        return (kid not in self._keys or stale) and now - self._tried_at >= self._min_refetch_s

    async def _key(self, kid: str) -> Any:
        if self._wants(kid) or self._fetching.locked():  # a fetch is due, or one is under way
            async with self._fetching:
                if self._wants(kid):  # not fetched meanwhile by the call we waited for
                    self._tried_at = time.monotonic()  # failed or not, the next try waits min_refetch_s
                    try:
                        jwks = await self._fetch()
                    except Exception as error:  # noqa: BLE001 - any failure to reach auth_svc
                        if not self._keys:
                            raise Unavailable("cannot fetch the token signing keys") from error
                    else:
                        self._fetched_at = time.monotonic()
                        keys = {k["kid"]: jwt.PyJWK(k).key for k in jwks.get("keys", []) if k.get("alg") == ALGORITHM}
                        if keys.keys() != self._keys.keys():
                            self._verified.clear()  # a key withdrawn takes its tokens with it
                        self._keys = keys
        if not self._keys:
            raise Unavailable("cannot fetch the token signing keys")
        if kid not in self._keys:
            raise Unauthenticated("token signed with an unknown key")
        return self._keys[kid]

    async def verify(self, token: str, audience: str) -> dict[str, Any]:
        """The token's claims, or Unauthenticated: bad signature, algorithm, audience, issuer or time."""
        claims = self._verified.get((token, audience))
        fresh = time.monotonic() - self._fetched_at < self._settings.jwks_max_age_s  # else: refetch the keys first
        if claims is not None and fresh and time.time() < claims["exp"] + self._settings.leeway_s:
            self._verified.move_to_end((token, audience))
            return claims
        claims = await self._check(token, audience)
        self._verified[(token, audience)] = claims
        while len(self._verified) > MAX_VERIFIED:
            self._verified.popitem(last=False)
        return claims

    async def _check(self, token: str, audience: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        if header.get("alg") != ALGORITHM or not isinstance(header.get("kid"), str):
            raise Unauthenticated("token algorithm not accepted")
        key = await self._key(header["kid"])
        try:
            return jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=audience, issuer=ISSUER, leeway=self._settings.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"invalid token: {type(error).__name__}") from None
