"""Generation and scoring backends behind one pair of protocols (see docs/backends.md).

Importing this package needs neither torch nor vllm: every backend imports its heavy
dependencies when it is constructed."""

from __future__ import annotations

from rstar.backends.base import (
    Completion,
    GenerationRequest,
    Generator,
    ScoreRequest,
    Scorer,
    dedup_completions,
)
from rstar.backends.hf import HFGenerator, HFGeneratorConfig, HFScorer, HFScorerConfig
from rstar.backends.http_backend import HTTPConfig, HTTPGenerator
from rstar.backends.vllm_backend import VLLMConfig, VLLMGenerator, VLLMScorer

__all__ = [
    "Completion",
    "GenerationRequest",
    "Generator",
    "HFGenerator",
    "HFGeneratorConfig",
    "HFScorer",
    "HFScorerConfig",
    "HTTPConfig",
    "HTTPGenerator",
    "ScoreRequest",
    "Scorer",
    "VLLMConfig",
    "VLLMGenerator",
    "VLLMScorer",
    "dedup_completions",
]
