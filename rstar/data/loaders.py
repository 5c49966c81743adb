"""Problem loaders: benchmark names, JSON lists, JSONL, and Hugging Face ``datasets``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from rstar.data.benchmarks import _canonical, resolve_benchmark
from rstar.data.problem import DataError, Problem, ValidationReport, rows_to_problems

logger = logging.getLogger(__name__)

__all__ = ["load_problems", "load_with_report"]

_HF_FILE_BUILDERS = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        if path.suffix == ".json":
            # A .json file that is really JSON lines is common; try that before failing.
            try:
                return _read_jsonl(path)
            except DataError:
                pass
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict):
        for key in ("data", "problems", "rows", "test"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DataError(f"{path}: expected a JSON list of problems (or an object with a 'data' list)")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of problems, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from e
    return rows


def _pick_split(dd: Mapping[str, Any], split: str | None, where: str) -> Any:
    if split is not None:
        if split not in dd:
            raise DataError(f"{where}: no split {split!r}; available: {sorted(dd)}")
        return dd[split]
    if len(dd) == 1:
        return next(iter(dd.values()))
    if "test" in dd:
        return dd["test"]
    raise DataError(f"{where}: several splits {sorted(dd)}; pass split=...")


def _hf_rows(source: str, split: str | None, *, local_dir: Path | None = None, builder: str | None = None,
             limit: int | None = None) -> Iterable[Mapping[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(
            f"loading {source!r} needs the Hugging Face `datasets` package: pip install 'rstar[train]'"
        ) from e
    if local_dir is not None:
        ds = datasets.load_from_disk(str(local_dir))
    elif builder is not None:
        ds = datasets.load_dataset(builder, data_files=source, split=split or "train")
    else:
        ds = datasets.load_dataset(source, split=split) if split else datasets.load_dataset(source)
    if isinstance(ds, (datasets.DatasetDict, dict)):
        ds = _pick_split(ds, split, source)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def load_with_report(
    source: str | Path,
    *,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    empty_answers: str = "keep",
) -> tuple[list[Problem], ValidationReport]:
    """Like :func:`load_problems`, also returning the :class:`ValidationReport` (duplicates etc.)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    src = str(source)
    path = Path(src).expanduser()
    name: str | None = None
    if not path.exists() and _canonical(src) is not None:
        path = resolve_benchmark(src, data_dir)
        name = _canonical(src)
    rows: Iterable[Mapping[str, Any]]
    if path.is_dir():
        rows = _hf_rows(src, split, local_dir=path, limit=limit)
        name = name or path.name
    elif path.is_file():
        suffix = path.suffix.lower()
        name = name or path.stem
        if suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix in _HF_FILE_BUILDERS:
            rows = _hf_rows(str(path), split, builder=_HF_FILE_BUILDERS[suffix], limit=limit)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl, .csv, .parquet)")
    elif src.startswith(("/", ".", "~")) or src.endswith((".json", ".jsonl", ".csv", ".parquet")):
        raise DataError(f"{src}: no such file or directory")
    else:
        # A Hugging Face Hub dataset id such as "HuggingFaceH4/MATH-500".
        logger.info("loading %s from the Hugging Face Hub (split %s)", src, split or "auto")
        rows = _hf_rows(src, split, limit=limit)
        name = src
    if limit is not None:
        rows = islice(rows, limit)
    return rows_to_problems(rows, source=name or src, column_map=column_map, empty_answers=empty_answers)


def load_problems(
    source: str | Path,
    *,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    empty_answers: str = "keep",
) -> list[Problem]:
    """Load problems from a benchmark name, a JSON/JSONL file, a saved dataset dir, or a Hub id.

    ``column_map`` maps ``id``/``question``/``answer`` to the source's column names (e.g.
    ``{"question": "problem", "answer": "solution"}``); ``split`` picks a datasets split; ``limit``
    keeps the first N rows; ``empty_answers`` is ``"keep"``, ``"drop"`` or ``"error"``.  Problems are
    keyed by id; see :func:`load_with_report` for the duplicates and the rest of the report.
    """
    problems, _ = load_with_report(
        source, column_map=column_map, split=split, limit=limit, data_dir=data_dir, empty_answers=empty_answers
    )
    return problems
