"""Typed readers for configuration from environment variables, with defaults.

Each service declares its own frozen dataclass with a from_env() built on these, so every
setting has one documented name and one default.
"""

from __future__ import annotations

import os


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_parsed(name: str, default, parse, kind: str):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name} must be {kind}, got {raw!r}") from None


def env_int(name: str, default: int) -> int:
    return _env_parsed(name, default, int, "an integer")


def env_float(name: str, default: float) -> float:
    return _env_parsed(name, default, float, "a number")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]
