"""The API key format, which every service agrees on.

`ck-`, 43 random URL-safe characters, then a 6-character checksum (CRC32 of everything before it,
in base 62, as GitHub's tokens carry one): a random or mistyped key is refused where it arrives,
with no lookup. Keys made before the checksum (`ck-` and 43 characters) keep working; only their
SHA-256 is ever stored.
"""

from __future__ import annotations

import hmac
import secrets
import string
import zlib

PREFIX = "ck-"
RANDOM_CHARS = 43  # secrets.token_urlsafe(32)
CHECKSUM_CHARS = 6
CHECKSUMMED_LENGTH = len(PREFIX) + RANDOM_CHARS + CHECKSUM_CHARS
_BASE62 = string.digits + string.ascii_letters


def _checksum(body: str) -> str:
    value, out = zlib.crc32(body.encode()), []
    for _ in range(CHECKSUM_CHARS):  # 62**6 > 2**32: every CRC32 fits
        value, digit = divmod(value, 62)
        out.append(_BASE62[digit])
    return "".join(reversed(out))


def new_api_key() -> str:
    body = PREFIX + secrets.token_urlsafe(32)
    return body + _checksum(body)


def checksum_verdict(key: str) -> bool | None:
    """Whether a key of the checksummed shape carries its checksum; None for any other shape
    (a key made before checksums, or no key of ours at all: only a lookup can tell)."""
    if len(key) != CHECKSUMMED_LENGTH or not key.startswith(PREFIX):
        return None
    return hmac.compare_digest(_checksum(key[:-CHECKSUM_CHARS]), key[-CHECKSUM_CHARS:])
