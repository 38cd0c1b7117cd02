"""Typed configuration from environment variables: one declaration per setting.

Each service declares a frozen dataclass whose fields are `setting(default, "ENV_NAME")`;
`from_env(cls)` reads every declared variable and parses it as its default's type
(str, int, float, or a comma-separated tuple of strings). Unset or empty means the default.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

T = TypeVar("T")


def setting(default: Any, env: str) -> Any:
    """A dataclass field read from the environment variable `env`."""
    return dataclasses.field(default=default, metadata={"env": env})


def _parse(raw: str, like: Any, env: str) -> Any:
    try:
        if isinstance(like, tuple):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if isinstance(like, bool):
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        return type(like)(raw)
    except ValueError:
        raise ValueError(f"{env} must be {type(like).__name__}, got {raw!r}") from None


def from_env(cls: type[T], environ: dict[str, str] | None = None) -> T:
    """An instance of the settings class cls, every declared variable read from the environment."""
    environ = os.environ if environ is None else environ
    values = {}
    for field in dataclasses.fields(cls):
        env = field.metadata.get("env")
        raw = environ.get(env, "") if env else ""
        if raw.strip():
            values[field.name] = _parse(raw, field.default, env)
    return cls(**values)
