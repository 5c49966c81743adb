"""Evaluation metrics: pass@k, votes (majority, reward-weighted, top-n by reward), report tables.

Votes group answers by equivalence (``answers_equal``), not by string, so ``0.5`` and ``\\frac12``
vote together.  Grouping is greedy in input order: an answer joins the first group whose first
member it equals.  Ties are broken deterministically (no ``random.sample`` as in the official
``eval_maj.py``): larger vote total, then more members, then the highest single score, then the
group that appeared first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "pass_at_k",
    "mean_pass_at_k",
    "accuracy",
    "group_answers",
    "majority_vote",
    "weighted_vote",
    "top_n_vote",
    "Report",
    "report",
]

Equal = Callable[[str, str], bool]


def _default_equal(a: str, b: str) -> bool:
    from rstar.grading import answers_equal  # lazy: metrics without grading stays cheap

    return answers_equal(a, b)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable running product."""
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of samples n={n}")
    if n - c < k:
        return 1.0
    # prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, no cancellation.
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(samples: Sequence[Sequence[bool]], k: int) -> float:
    """Mean unbiased pass@k over problems, each with its own list of per-sample correctness."""
    if not samples:
        raise ValueError("no problems")
    return sum(pass_at_k(len(s), sum(bool(x) for x in s), k) for s in samples) / len(samples)


def accuracy(correct: Sequence[bool]) -> float:
    """pass@1 of one answer per problem (the mean of correctness)."""
    if not correct:
        raise ValueError("no results")
    return sum(bool(x) for x in correct) / len(correct)


def group_answers(answers: Sequence[str | None], equal: Equal | None = None) -> list[list[int]]:
    """Indices of equivalent answers, groups in order of first appearance; None/empty answers skipped."""
    eq = equal or _default_equal
    by_text: dict[str, int] = {}
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None or not str(a).strip():
            continue
        key = str(a).strip()
        if key in by_text:  # identical text: no equivalence call needed
            groups[by_text[key]].append(i)
            continue
        for gi, g in enumerate(groups):
            if eq(str(answers[g[0]]).strip(), key):
                groups[gi].append(i)
                by_text[key] = gi
                break
        else:
            by_text[key] = len(groups)
            groups.append([i])
    return groups


def _vote(answers: Sequence[str | None], weights: Sequence[float] | None, equal: Equal | None) -> str | None:
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    groups = group_answers(answers, equal)
    if not groups:
        return None
    w = [1.0] * len(answers) if weights is None else [float(x) for x in weights]

    def rank(item: tuple[int, list[int]]) -> tuple[float, int, float, int]:
        order, g = item
        return (sum(w[i] for i in g), len(g), max(w[i] for i in g), -order)

    _, best = max(enumerate(groups), key=rank)
    return str(answers[best[0]]).strip()


def majority_vote(
    answers: Sequence[str | None],
    weights: Sequence[float] | None = None,
    equal: Equal | None = None,
) -> str | None:
    """The most common answer up to equivalence (weighted by ``weights`` when given); None if none.

    Returns the group's first-seen spelling.  Tie-break: see the module docstring.
    """
    return _vote(answers, weights, equal)


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float], equal: Equal | None = None) -> str | None:
    """Reward-weighted vote: the group with the largest sum of scores (official ``eval_maj.py``)."""
    return _vote(answers, scores, equal)


def top_n_vote(
    answers: Sequence[str | None],
    scores: Sequence[float],
    n: int,
    equal: Equal | None = None,
    *,
    weighted: bool = False,
) -> str | None:
    """The paper's test-time recipe: pool answers, keep the ``n`` best by PPM score, then vote.

    Answers that are None are dropped before ranking; equal scores keep input order.  ``weighted``
    uses the score-weighted vote on the kept answers instead of the plain majority.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(scores) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores")
    valid = [i for i, a in enumerate(answers) if a is not None and str(a).strip()]
    kept = sorted(valid, key=lambda i: -float(scores[i]))[:n]
    kept.sort()  # vote in the original order so first-seen spellings are stable
    sub_a = [answers[i] for i in kept]
    sub_s = [float(scores[i]) for i in kept]
    return _vote(sub_a, sub_s if weighted else None, equal)


@dataclass
class Report:
    """Per-benchmark accuracy table; ``extra`` holds further columns (e.g. pass@8, maj@8) as fractions."""

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)

    def average(self) -> dict[str, float]:
        """Macro average over benchmarks of every fractional column (papers report this)."""
        out: dict[str, float] = {}
        for col in self.columns:
            vals = [r[col] for r in self.rows.values() if col in r]
            if vals:
                out[col] = sum(vals) / len(vals)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmarks": {k: dict(v) for k, v in self.rows.items()},
            "average": self.average(),
            "columns": list(self.columns),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def to_text(self, digits: int = 1) -> str:
        """A fixed-width table, accuracies in percent."""
        header = ["benchmark", "n", *self.columns]
        lines = []
        for name, r in self.rows.items():
            cells = [name, str(int(r["n"]))] + [
                f"{100 * r[c]:.{digits}f}" if c in r and not math.isnan(r[c]) else "-" for c in self.columns
            ]
            lines.append(cells)
        if len(self.rows) > 1:
            avg = self.average()
            lines.append(["average", str(sum(int(r["n"]) for r in self.rows.values()))]
                         + [f"{100 * avg[c]:.{digits}f}" if c in avg else "-" for c in self.columns])
        widths = [max(len(header[i]), *(len(l[i]) for l in lines)) for i in range(len(header))]
        fmt = lambda cells: "  ".join(  # noqa: E731
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)
        )
        sep = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(header), sep, *(fmt(l) for l in lines)])


def report(
    results: Mapping[str, Sequence[bool]],
    extra: Mapping[str, Mapping[str, float]] | None = None,
) -> Report:
    """Build a :class:`Report` from per-benchmark correctness lists (one bool per problem).

    ``extra[benchmark][column]`` adds columns such as ``{"maj@8": 0.61, "pass@8": 0.8}``.
    """
    rep = Report(columns=["accuracy"])
    for name, correct in results.items():
        if len(correct) == 0:
            raise ValueError(f"benchmark {name!r} has no results")
        rep.rows[name] = {"n": float(len(correct)), "correct": float(sum(bool(x) for x in correct)),
                          "accuracy": accuracy(correct)}
    for name, cols in (extra or {}).items():
        if name not in rep.rows:
            raise KeyError(f"extra columns for {name!r}, which has no results")
        for col, val in cols.items():
            if col in ("n", "correct"):
                raise ValueError(f"column name {col!r} is reserved")
            if col not in rep.columns:
                rep.columns.append(col)
            rep.rows[name][col] = float(val)
    return rep
