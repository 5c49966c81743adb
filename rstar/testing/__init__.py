"""Tiny locally built models and tokenizers for tests and benchmarks (no model hub needed)."""

from __future__ import annotations

from rstar.testing.contract import assert_valid_completions
from rstar.testing.models import (
    EOS_TOKEN,
    PAD_TOKEN,
    STEP_TOKENS,
    TinyModelSpec,
    build_tiny_classifier,
    build_tiny_model,
    train_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "STEP_TOKENS",
    "TinyModelSpec",
    "assert_valid_completions",
    "build_tiny_classifier",
    "build_tiny_model",
    "train_tokenizer",
]
