"""API keys: `ck-` and 43 random URL-safe characters; only their SHA-256 is ever stored."""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "ck-"
_SHAPE = re.compile(r"^ck-[A-Za-z0-9_-]{40,200}$")


def new_api_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def looks_like_a_key(text: str) -> bool:
    return bool(_SHAPE.match(text))


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def display_prefix(api_key: str) -> str:
    """Enough to recognise a key in a list ("ck-AbCd…wxyz"), far too little to use it."""
    return f"{api_key[:7]}…{api_key[-4:]}"
