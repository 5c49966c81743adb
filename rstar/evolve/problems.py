"""Problem sets of a run, materialised once into the run directory (so a resumed or
re-planned run searches exactly the same problems)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rstar.data import Problem
from rstar.evolve.config import ProblemSource

logger = logging.getLogger(__name__)


def load_source(src: ProblemSource, world_config: dict[str, Any] | None = None) -> list[Problem]:
    """The problems of ``src`` (nano world or anything ``rstar.data.load_problems`` reads)."""
    if src.source == "nano":
        from rstar.evolve.world import World, WorldConfig

        if not src.n:
            raise ValueError(f"{src.label}: a nano problem set needs n")
        world = World(WorldConfig(**(world_config or {})))
        return world.problems(src.split, src.n, difficulties=src.difficulties)
    from rstar.data import load_problems

    split = src.split or None
    problems = load_problems(src.source, column_map=src.column_map, split=split, limit=src.n, empty_answers="drop")
    if src.answer_from_boxed:
        import dataclasses

        from rstar.grading import extract_boxed

        kept = []
        for p in problems:
            gold = extract_boxed(p.answer)
            if gold:
                kept.append(dataclasses.replace(p, answer=gold))
        if len(kept) < len(problems):
            logger.warning("%s: %d of %d rows have no \\boxed{} answer and were dropped", src.label,
                           len(problems) - len(kept), len(problems))
        problems = kept
    return problems


def write_problems(problems: list[Problem], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for p in problems:
            f.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer, "source": p.source,
                                "meta": p.meta}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_problems(path: Path) -> list[Problem]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append(Problem(str(d["id"]), d["question"], str(d["answer"]), d.get("source", ""),
                                   d.get("meta") or {}))
    return out


def difficulty(p: Problem) -> int | None:
    """The nano world's difficulty (number of operations) when the problem has one."""
    d = (getattr(p, "meta", None) or {}).get("difficulty")
    return int(d) if d is not None else None
