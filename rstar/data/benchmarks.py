"""Standard benchmark names and where their files are found."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BENCHMARKS", "ALIASES", "resolve_benchmark", "default_data_dirs", "benchmark_names"]

# name -> file name under shared/data (the eval_data/ files of microsoft/rStar, branch rStar-math)
BENCHMARKS: dict[str, str] = {
    "math500": "math500_test.json",
    "gsm8k": "GSM8K_test.json",
    "aime2024": "aime2024_test.json",
    "amc23": "amc23_test.json",
    "olympiadbench": "olympiadbench_test.json",
    "collegemath": "collegemath_test.json",
    "gaokao2023en": "gaokao2023en_test.json",
    "omni-math": "omni_test.json",
    "math": "MATH_test.json",
}
ALIASES: dict[str, str] = {
    "math-500": "math500",
    "omni": "omni-math",
    "omnimath": "omni-math",
    "omni_math": "omni-math",
    "aime24": "aime2024",
    "amc2023": "amc23",
    "college-math": "collegemath",
    "college_math": "collegemath",
    "gaokao2023": "gaokao2023en",
    "olympiad": "olympiadbench",
    "gsm8k_test": "gsm8k",
}


def benchmark_names() -> list[str]:
    return list(BENCHMARKS)


def _canonical(name: str) -> str | None:
    key = name.strip().lower()
    if key in BENCHMARKS:
        return key
    return ALIASES.get(key)


def default_data_dirs() -> list[Path]:
    """``$RSTAR_DATA_DIR``, then ``<repo>/../shared/data`` (a source checkout next to shared data)."""
    dirs = []
    env = os.environ.get("RSTAR_DATA_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    repo = Path(__file__).resolve().parents[2]
    dirs.append(repo.parent / "shared" / "data")
    return dirs


def resolve_benchmark(name: str, data_dir: str | Path | None = None) -> Path:
    """Path of a standard benchmark's file: in ``data_dir`` if given, else the default dirs.

    Raises ``KeyError`` for an unknown name and ``FileNotFoundError`` (saying how to point to the
    files) when the file is in none of the places searched.
    """
    canon = _canonical(name)
    if canon is None:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    fname = BENCHMARKS[canon]
    dirs = [Path(data_dir).expanduser()] if data_dir is not None else default_data_dirs()
    for d in dirs:
        p = d / fname
        if p.is_file():
            return p
    tried = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"benchmark {canon!r} ({fname}) not found in: {tried}. Put the eval_data JSON files in a "
        f"folder and set RSTAR_DATA_DIR=/path/to/folder (or pass data_dir=...), or load the file "
        f"directly with load_problems('/path/to/{fname}')"
    )
