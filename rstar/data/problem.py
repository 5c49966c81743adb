"""The problem record and the validation of a loaded problem set."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rstar.grading.normalize import gold_alternatives, repair_escapes

logger = logging.getLogger(__name__)

__all__ = ["Problem", "DataError", "DuplicateQuestion", "ValidationReport", "rows_to_problems"]


class DataError(ValueError):
    """A problem file or row that cannot be used as given (the message says which and why)."""


@dataclass(frozen=True)
class Problem:
    id: str  # stable key (never the question text)
    question: str
    answer: str
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def answers(self) -> list[str]:
        """Accepted answers (several when the gold is a list, e.g. "either focus")."""
        return gold_alternatives(self.answer)


@dataclass(frozen=True)
class DuplicateQuestion:
    """One question text that occurs under several ids."""

    question: str
    ids: tuple[str, ...]
    answers: tuple[str, ...]

    @property
    def conflicting(self) -> bool:
        return len(set(self.answers)) > 1


@dataclass
class ValidationReport:
    """What validation found; kept with the problems instead of being silently fixed."""

    source: str
    rows: int = 0
    duplicates: list[DuplicateQuestion] = field(default_factory=list)
    coerced_answers: list[str] = field(default_factory=list)  # ids with non-string answers made strings
    list_answers: list[str] = field(default_factory=list)  # ids whose gold is a list of alternatives
    repaired: list[str] = field(default_factory=list)  # ids whose text had escape damage repaired
    empty_answers: list[str] = field(default_factory=list)  # ids with an empty gold (never gradable)
    dropped: list[str] = field(default_factory=list)  # ids dropped (empty_answers="drop")

    @property
    def conflicting(self) -> list[DuplicateQuestion]:
        return [d for d in self.duplicates if d.conflicting]

    def summary(self) -> str:
        return (
            f"{self.source}: {self.rows} problems; {len(self.duplicates)} repeated questions "
            f"({len(self.conflicting)} with different answers, kept as separate problems); "
            f"{len(self.list_answers)} list answers; {len(self.coerced_answers)} non-string answers "
            f"converted; {len(self.repaired)} escape repairs; {len(self.empty_answers)} empty answers"
            + (f" ({len(self.dropped)} dropped)" if self.dropped else "")
        )


def _answer_to_str(value: Any, where: str) -> tuple[str, str | None]:
    """(answer string, kind of coercion or None).  Lists become the ``"['a', 'b']"`` form."""
    if isinstance(value, str):
        return value.strip(), None
    if isinstance(value, bool):
        raise DataError(f"{where}: answer is a boolean ({value!r}); expected a string or a number")
    if isinstance(value, int):
        return str(value), "number"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise DataError(f"{where}: answer is {value!r}")
        return (str(int(value)) if value.is_integer() else repr(value)), "number"
    if isinstance(value, (list, tuple)):
        items = []
        for v in value:
            s, _ = _answer_to_str(v, where)
            items.append(repair_escapes(s))
        if not items:
            raise DataError(f"{where}: answer is an empty list")
        if len(items) == 1:
            return items[0], "list"
        return repr(items), "list"
    if value is None:
        raise DataError(f"{where}: missing answer (null)")
    raise DataError(f"{where}: answer has type {type(value).__name__}; expected a string, number or list")


def rows_to_problems(
    rows: Iterable[Mapping[str, Any]],
    *,
    source: str,
    column_map: Mapping[str, str] | None = None,
    empty_answers: str = "keep",
) -> tuple[list[Problem], ValidationReport]:
    """Validate raw rows and build problems; raise :class:`DataError` on unusable data.

    ``column_map`` maps our field names (``id``, ``question``, ``answer``) to the row's column names.
    Without an id column the row's position is the id (``index`` is used when present).
    ``empty_answers``: ``"keep"`` (default; the official files have a few, e.g. 9 in Omni-MATH, and
    published accuracies count them as wrong), ``"drop"`` (e.g. for training) or ``"error"``.
    """
    if empty_answers not in ("keep", "drop", "error"):
        raise ValueError(f"empty_answers must be 'keep', 'drop' or 'error', got {empty_answers!r}")
    cmap = dict(column_map or {})
    unknown = set(cmap) - {"id", "question", "answer"}
    if unknown:
        raise DataError(f"column_map keys must be among id/question/answer, got {sorted(unknown)}")
    q_col = cmap.get("question", "question")
    a_col = cmap.get("answer", "answer")
    id_cols = [cmap["id"]] if "id" in cmap else ["id", "index"]
    report = ValidationReport(source=source)
    problems: list[Problem] = []
    seen_ids: dict[str, int] = {}
    dup_ids: list[str] = []
    for pos, row in enumerate(rows):
        where = f"{source}: row {pos}"
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object with question/answer, got {type(row).__name__}")
        missing = [c for c in (q_col, a_col) if c not in row]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {missing}; present: {sorted(row)[:12]} "
                "(use column_map={'question': ..., 'answer': ...} to map other names)"
            )
        pid_raw = next((row[c] for c in id_cols if c in row and row[c] is not None), None)
        if "id" in cmap and pid_raw is None:
            raise DataError(f"{where}: missing id column {cmap['id']!r}")
        pid = str(pid_raw) if pid_raw is not None else str(pos)
        where = f"{source}: row {pos} (id {pid})"
        question = row[q_col]
        if not isinstance(question, str):
            raise DataError(f"{where}: question has type {type(question).__name__}; expected a string")
        if not question.strip():
            raise DataError(f"{where}: empty question")
        answer, coerced = _answer_to_str(row[a_col], where)
        if not answer:
            if empty_answers == "error":
                raise DataError(f"{where}: empty answer")
            report.empty_answers.append(pid)
            if empty_answers == "drop":
                report.dropped.append(pid)
                if pid in seen_ids:
                    dup_ids.append(pid)
                seen_ids.setdefault(pid, pos)
                continue
        q_fixed, a_fixed = repair_escapes(question), repair_escapes(answer)
        if q_fixed != question or a_fixed != answer:
            report.repaired.append(pid)
        if coerced == "number":
            report.coerced_answers.append(pid)
        elif coerced == "list":
            report.list_answers.append(pid)
        if pid in seen_ids:
            dup_ids.append(pid)
            continue
        seen_ids[pid] = pos
        meta = {k: v for k, v in row.items() if k not in (q_col, a_col) and k not in id_cols}
        if coerced == "list":
            meta["answer_alternatives"] = gold_alternatives(a_fixed)
        problems.append(Problem(pid, q_fixed, a_fixed, source, meta))
    if dup_ids:
        raise DataError(
            f"{source}: {len(dup_ids)} duplicated id(s), e.g. {sorted(set(dup_ids))[:5]}; ids must be unique "
            "(map another column with column_map={'id': ...})"
        )
    if not problems:
        raise DataError(f"{source}: no problems found")
    report.rows = len(problems)
    by_q: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_q[p.question.strip()].append(p)
    for q, ps in by_q.items():
        if len(ps) > 1:
            report.duplicates.append(DuplicateQuestion(q, tuple(p.id for p in ps), tuple(p.answer for p in ps)))
    if report.conflicting:
        ex = report.conflicting[0]
        logger.warning(
            "%s: %d question(s) repeat with different answers (kept apart, keyed by id), e.g. ids %s: %s",
            source, len(report.conflicting), list(ex.ids), list(ex.answers),
        )
    if report.empty_answers:
        logger.warning(
            "%s: %d problem(s) have an empty answer (%s), e.g. ids %s",
            source, len(report.empty_answers),
            "dropped" if empty_answers == "drop" else "kept; they can never be graded correct",
            report.empty_answers[:5],
        )
    if report.coerced_answers:
        logger.info("%s: %d numeric answers converted to strings", source, len(report.coerced_answers))
    if report.repaired:
        logger.info("%s: repaired escape damage (e.g. form feed + 'rac') in %d rows", source, len(report.repaired))
    return problems, report
