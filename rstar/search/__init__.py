"""The search: step protocol, prompts, and MCTS / beam / best-of-N / greedy drivers.

``steps`` and ``prompts`` are light (pure strings) and shared with training; the drivers
(``Searcher``, ``search``) and configs load lazily so importing the protocol stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

from rstar.search.prompts import PromptConfig, build_prompt, training_row
from rstar.search.steps import (
    SPECIAL_TOKENS,
    ParsedStep,
    StepKind,
    block_program,
    join_steps,
    parse_step,
    split_steps,
)

_LAZY = {
    "SearchConfig": "rstar.search.config",
    "GenerationConfig": "rstar.search.config",
    "load_search_config": "rstar.search.config",
    "PRESETS": "rstar.search.config",
    "Searcher": "rstar.search.driver",
    "SearchResult": "rstar.search.driver",
    "search": "rstar.search.driver",
}

__all__ = [
    "SPECIAL_TOKENS",
    "ParsedStep",
    "StepKind",
    "PromptConfig",
    "block_program",
    "build_prompt",
    "join_steps",
    "parse_step",
    "split_steps",
    "training_row",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'rstar.search' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
