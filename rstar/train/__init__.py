"""Training data from search trees and the ``train-sft`` / ``train-ppm`` jobs.

Mining (``mine_sft``, ``mine_pairs``) is pure Python; the trainers (``train_sft``,
``train_ppm``) import torch and transformers only when called."""

from __future__ import annotations

import importlib
from typing import Any

from rstar.train.mining import (
    PairMiningConfig,
    PairStats,
    SFTMiningConfig,
    edit_distance,
    load_rows_dataset,
    mine_files,
    mine_pairs,
    mine_sft,
    pair_weight,
    read_jsonl,
    read_trees,
    write_jsonl,
)

_LAZY = {
    "SFTArguments": "rstar.train.sft",
    "train_sft": "rstar.train.sft",
    "PPMArguments": "rstar.train.ppm",
    "PPMTrainer": "rstar.train.ppm",
    "train_ppm": "rstar.train.ppm",
    "ensure_step_tokens": "rstar.train.tokens",
}

__all__ = [
    "PairMiningConfig",
    "PairStats",
    "SFTMiningConfig",
    "edit_distance",
    "load_rows_dataset",
    "mine_files",
    "mine_pairs",
    "mine_sft",
    "pair_weight",
    "read_jsonl",
    "read_trees",
    "write_jsonl",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'rstar.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
