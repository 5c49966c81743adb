"""Shared fixtures: where the benchmark data lives, and tiny locally built models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$RSTAR_DATA_DIR`` or ``<repo>/../shared/data`` (where CI lays the benchmark files)."""
    env = os.environ.get("RSTAR_DATA_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def test_cache_dir() -> Path:
    """Built test artefacts (tiny models) are cached here between runs."""
    d = Path(os.environ.get("RSTAR_TEST_CACHE", REPO_ROOT / ".cache" / "tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not (d / "math500_test.json").is_file():
        pytest.fail(f"benchmark data not found in {d}; set RSTAR_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny random Qwen2 causal LM + locally trained tokenizer (rstar.testing), built once."""
    from rstar.testing import build_tiny_model

    return build_tiny_model(test_cache_dir() / "tiny-qwen2")
