"""Resumable stages: each stage writes its artefacts into a directory and, last, a small JSON
record that says it finished (what it measured, how long it took). A stage whose record
exists is skipped; a stage killed half-way runs again (the search resumes from its JSONL,
training from its last checkpoint)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class StageRecord:
    """What a finished stage left behind."""

    name: str
    round: int
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # found complete on disk in this run

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "round": self.round, "seconds": round(self.seconds, 3), "result": self.result}


def record_path(round_dir: Path, name: str) -> Path:
    return round_dir / "stages" / f"{name}.json"


def read_record(round_dir: Path, name: str) -> StageRecord | None:
    p = record_path(round_dir, name)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON: the stage runs again", p)
        return None
    return StageRecord(data["name"], int(data["round"]), float(data["seconds"]), data.get("result", {}), True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write, fsync, rename: a reader sees the old file or the whole new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_stage(round_dir: Path, name: str, round_index: int, fn: Callable[[], dict[str, Any]]) -> StageRecord:
    """Run ``fn`` unless the stage already finished; record its result and duration."""
    done = read_record(round_dir, name)
    if done is not None:
        logger.info("round %d: %s already done (%.1fs), skipped", round_index, name, done.seconds)
        return done
    logger.info("round %d: %s ...", round_index, name)
    t0 = time.perf_counter()
    result = fn() or {}
    rec = StageRecord(name, round_index, time.perf_counter() - t0, result)
    write_json_atomic(record_path(round_dir, name), rec.to_json())
    logger.info("round %d: %s done in %.1fs", round_index, name, rec.seconds)
    return rec
