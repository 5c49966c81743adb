"""Deterministic shards of a problem list, failure records, and merging shard outputs.

Sharding is by a **stable hash of the problem id** (blake2b, not Python's salted ``hash``):
problem ``p`` belongs to shard ``blake2b(p.id) mod n``. A problem's shard therefore depends
only on its id and ``n``: not on the order of the file, the ``--limit`` or on other problems
added or removed. Shards are balanced up to the hash's randomness (a few percent at
thousands of problems per shard). Within a shard, problems keep the list's order.

``merge_shards`` concatenates shard outputs (the per-problem JSONL of ``rstar search``) into
one file, keeps the first record of an id that occurs more than once, and reports, against
the problem list when one is given, which ids are missing, duplicated or unexpected."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

P = TypeVar("P")


def shard_of(problem_id: str, num_shards: int) -> int:
    """The shard (``0 <= s < num_shards``) of one problem id: stable across runs and machines."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    h = hashlib.blake2b(str(problem_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") % num_shards


def check_shard(index: int, num_shards: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index must be in [0, {num_shards}), got {index}")


def select_shard(problems: Sequence[P], index: int, num_shards: int) -> list[P]:
    """The problems of shard ``index`` of ``num_shards`` (by ``shard_of(p.id)``), in order."""
    check_shard(index, num_shards)
    return [p for p in problems if shard_of(str(p.id), num_shards) == index]


def format_shard_path(path: str | os.PathLike[str], index: int, num_shards: int) -> str:
    """``path`` with ``{shard}`` / ``{num_shards}`` filled in (``trees.{shard}.jsonl``)."""
    return str(path).replace("{shard}", str(index)).replace("{num_shards}", str(num_shards))


# --------------------------------------------------------------------------- failure records
def failure_record(problem: Any, error: str, attempts: int, mode: str = "", config: Any = None) -> dict[str, Any]:
    """The output line of a problem that could not be searched (a poison problem: it killed
    or failed every worker that took it). It has the fields of a search record with an empty
    tree, plus ``failed: true``, ``error`` and ``attempts``; miners skip it (no nodes)."""
    return {
        "id": str(problem.id), "question": problem.question, "answer": str(problem.answer),
        "source": getattr(problem, "source", ""), "mode": mode, "config": config or {},
        "nodes": [], "answers": [], "chosen": {"answer": None, "node": None, "correct": None},
        "stats": {"nodes": 0, "tokens": 0, "execs": 0, "expansions": 0, "rollouts": 0, "seconds": 0.0},
        "failed": True, "error": error, "attempts": int(attempts),
    }


def is_failure(record: dict[str, Any]) -> bool:
    return bool(record.get("failed"))


# --------------------------------------------------------------------------- merge
@dataclass
class MergeReport:
    """What ``merge_shards`` found.

    Attributes:
        written: records in the merged output.
        missing: ids of the problem list with no record in any input (list order).
        duplicated: id -> number of records found for it (> 1); the first one is kept.
        unexpected: ids in the inputs that are not in the problem list.
        failed: ids whose (kept) record is a failure record.
        torn: inputs whose last line was cut (a killed writer); the torn line is skipped.
        per_input: records read from each input.
    """

    written: int = 0
    missing: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    per_input: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No missing and no duplicated problem."""
        return not self.missing and not self.duplicated

    def to_dict(self) -> dict[str, Any]:
        return {"written": self.written, "ok": self.ok, "missing": self.missing,
                "duplicated": self.duplicated, "unexpected": self.unexpected, "failed": self.failed,
                "torn": self.torn, "per_input": self.per_input}

    def summary(self) -> str:
        def few(ids: Iterable[str]) -> str:
            ids = list(ids)
            head = ", ".join(ids[:10])
            return head + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")

        lines = [f"merged {self.written} records from {len(self.per_input)} inputs"]
        if self.missing:
            lines.append(f"MISSING {len(self.missing)}: {few(self.missing)}")
        if self.duplicated:
            lines.append(f"DUPLICATED {len(self.duplicated)} (first record kept): "
                         f"{few(f'{k} x{v}' for k, v in self.duplicated.items())}")
        if self.unexpected:
            lines.append(f"not in the problem list {len(self.unexpected)}: {few(self.unexpected)}")
        if self.failed:
            lines.append(f"failure records {len(self.failed)}: {few(self.failed)}")
        if self.torn:
            lines.append(f"torn last line skipped in: {few(self.torn)}")
        return "\n".join(lines)


def read_records(path: str | os.PathLike[str]) -> tuple[list[tuple[str, bytes]], bool]:
    """``(id, raw line)`` for every complete record of a JSONL output, and whether the file
    ends in a torn line (a writer killed mid-line). A bad line elsewhere is an error."""
    data = Path(path).read_bytes()
    out: list[tuple[str, bytes]] = []
    torn = False
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rid = str(rec["id"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if i == len(lines) - 1:  # no newline after it: a torn last record
                torn = True
                break
            raise ValueError(f"{path}:{i + 1}: not a search record ({exc})") from exc
        out.append((rid, line))
    return out, torn


def merge_shards(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None,
    problems: Sequence[Any] | None = None,
    *,
    drop_failed: bool = False,
) -> MergeReport:
    """Merge shard outputs into ``out`` (atomically; None = only report).

    Records are written in problem-list order when ``problems`` is given (unexpected ids
    after them, in input order), else in input order. The first record of a duplicated id is
    kept. ``drop_failed`` leaves failure records out, so that a rerun with the merged file
    as its output searches those problems again."""
    rep = MergeReport()
    first: dict[str, bytes] = {}
    counts: dict[str, int] = {}
    order: list[str] = []
    for path in inputs:
        recs, torn = read_records(path)
        rep.per_input[str(path)] = len(recs)
        if torn:
            rep.torn.append(str(path))
        for rid, line in recs:
            counts[rid] = counts.get(rid, 0) + 1
            if rid not in first:
                first[rid] = line
                order.append(rid)
    rep.duplicated = {k: v for k, v in counts.items() if v > 1}
    if problems is not None:
        ids = [str(p.id) for p in problems]
        known = set(ids)
        rep.missing = [i for i in ids if i not in first]
        rep.unexpected = [i for i in order if i not in known]
        final = [i for i in ids if i in first] + rep.unexpected
    else:
        final = order
    keep = []
    for rid in final:
        line = first[rid]
        if b'"failed"' in line and is_failure(json.loads(line)):
            rep.failed.append(rid)
            if drop_failed:
                continue
        keep.append(line)
    rep.written = len(keep)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for line in keep:
                    f.write(line)
                    f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    if rep.missing or rep.duplicated:
        logger.warning("%s", rep.summary())
    return rep
