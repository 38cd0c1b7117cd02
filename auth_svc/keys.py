"""API keys (their format: cloudach.apikeys); only their SHA-256 is ever stored."""

from __future__ import annotations

import hashlib
import re

from cloudach.apikeys import checksum_verdict, new_api_key

__all__ = ["display_prefix", "key_hash", "looks_like_a_key", "new_api_key"]
_SHAPE = re.compile(r"^ck-[A-Za-z0-9_-]{40,200}$")


def looks_like_a_key(text: str) -> bool:
    return bool(_SHAPE.match(text)) and checksum_verdict(text) is not False


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def display_prefix(api_key: str) -> str:
    """Enough to recognise a key in a list ("ck-AbCd…wxyz"), far too little to use it."""
    return f"{api_key[:7]}…{api_key[-4:]}"
