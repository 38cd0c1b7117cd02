"""Who is calling: every /v1 request needs `Authorization: Bearer <key>`.

Until auth_svc lands, the edge accepts the configured keys, compared by SHA-256 digest in
constant time. Keys never reach a log line or an error message.
"""

from __future__ import annotations

import hmac

from edge.config import key_digest
from edge.errors import ApiError

_MISSING = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_INCORRECT = "Incorrect API key provided. You can find your API keys in your Cloudach dashboard."


def bearer_key(authorization: str | None) -> str:
    if not authorization:
        raise ApiError(401, _MISSING, code="invalid_api_key")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, _MISSING, code="invalid_api_key")
    return key.strip()


class StaticKeys:
    def __init__(self, digests: frozenset[str]) -> None:
        self._digests = tuple(digests)

    def check(self, authorization: str | None) -> None:
        digest = key_digest(bearer_key(authorization))
        # Compare with every digest, so the time taken says nothing about which one was close.
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise ApiError(401, _INCORRECT, code="invalid_api_key")
