"""rstar: rStar-Math at scale.

Subpackages are imported lazily so that ``import rstar`` stays cheap and never needs the
optional heavy dependencies (torch, vllm, ray)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "engine",
    "sandbox",
    "grading",
    "data",
    "metrics",
    "backends",
    "testing",
    "search",
    "ppm",
    "train",
    "evolve",
    "distributed",
    "config",
    "cli",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"rstar.{name}")
    raise AttributeError(f"module 'rstar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SUBMODULES))
