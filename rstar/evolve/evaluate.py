"""Evaluation of a policy (and its PPM) the way the paper compares test-time methods.

``evaluate`` runs, per problem set, greedy decoding, best-of-N sampling and PPM-guided MCTS
through the normal search (``rstar.search.Searcher``: sandboxed execution, grading), writes
each method's trees as JSONL, and scores them:

* ``greedy``: the single greedy solution.
* ``bon_majority`` / ``bon_ppm``: the same N sampled solutions, answered by majority vote or
  by the PPM's score of the answer step.
* ``mcts_ppm``: MCTS with N rollouts, values from the PPM (``value=ppm``), answer = the
  terminal of highest Q. No ground truth is used to choose.

Accuracy by budget: best-of-N at k < N uses the first k samples (each sample is seeded by
its index, so this is exactly a k-sample run); MCTS at k uses the answers created in the
first k rollouts, ranked by their own PPM value (an anytime read of one N-rollout run; the
final Q is only known at the end). Tokens per problem are reported next to accuracy: MCTS
samples several candidates per expansion, so equal solutions are not equal tokens."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rstar.data import Problem

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- scoring records
def _sample_index(nodes: list[dict[str, Any]]) -> dict[int, int]:
    """node id -> index of its depth-1 ancestor among the root's children (the sample)."""
    parent = {n["id"]: n["parent"] for n in nodes}
    roots = sorted(n["id"] for n in nodes if n["parent"] == 0)
    order = {nid: i for i, nid in enumerate(roots)}
    out: dict[int, int] = {}
    for n in nodes:
        nid = n["id"]
        cur = nid
        while cur in parent and parent[cur] not in (0, -1):
            cur = parent[cur]
        if cur in order:
            out[nid] = order[cur]
    return out


def _majority_correct(answers: list[dict[str, Any]]) -> bool:
    from rstar.metrics import majority_vote

    if not answers:
        return False
    win = majority_vote([a["answer"] for a in answers])
    if win is None:
        return False
    for a in answers:
        if a["answer"] is not None and str(a["answer"]).strip() == win:
            return bool(a["correct"])
    from rstar.grading import answers_equal

    for a in answers:  # the winner's group, spelled differently
        if a["answer"] is not None and answers_equal(str(a["answer"]), win):
            return bool(a["correct"])
    return False


def _best_by(answers: list[dict[str, Any]], key: str) -> bool:
    best = None
    for a in answers:
        v = a.get(key)
        if v is None:
            continue
        if best is None or v > best[key]:
            best = a
    return bool(best["correct"]) if best is not None else False


def bon_at(record: dict[str, Any], k: int) -> dict[str, bool]:
    """Majority and PPM answers of the first ``k`` samples of a best-of-N record."""
    idx = _sample_index(record["nodes"])
    first = [a for a in record["answers"] if idx.get(a["node"], 1 << 30) < k]
    return {"majority": _majority_correct(first), "ppm": _best_by(first, "ppm")}


def mcts_at(record: dict[str, Any], k: int) -> bool:
    """Anytime MCTS answer after ``k`` rollouts: the best PPM-valued answer found so far."""
    rollout = {n["id"]: n.get("rollout", 0) for n in record["nodes"]}
    first = [a for a in record["answers"] if rollout.get(a["node"], 0) <= k]
    return _best_by(first, "ppm")


def _acc(xs: Sequence[bool]) -> float:
    return round(sum(bool(x) for x in xs) / len(xs), 4) if xs else 0.0


def _by_difficulty(problems: Sequence[Problem], correct: Sequence[bool]) -> dict[str, float]:
    from rstar.evolve.problems import difficulty

    groups: dict[int, list[bool]] = {}
    for p, ok in zip(problems, correct):
        d = difficulty(p)
        if d is not None:
            groups.setdefault(d, []).append(bool(ok))
    return {str(d): _acc(v) for d, v in sorted(groups.items())}


def score_records(method: str, problems: Sequence[Problem], records: Sequence[dict[str, Any]],
                  budgets: Iterable[int]) -> dict[str, Any]:
    """Accuracy (and by difficulty, by budget, tokens) of one method's records."""
    budgets = list(budgets)
    tokens = [r.get("stats", {}).get("tokens", 0) for r in records]
    out: dict[str, Any] = {"problems": len(records), "tokens_per_problem": round(sum(tokens) / max(len(tokens), 1), 1)}
    if method == "greedy":
        ok = [bool((r.get("chosen") or {}).get("correct")) for r in records]
        out["greedy"] = {"accuracy": _acc(ok), "by_difficulty": _by_difficulty(problems, ok)}
    elif method == "bon":
        for vote in ("majority", "ppm"):
            if vote == "ppm" and not any(a.get("ppm") is not None for r in records for a in r["answers"]):
                continue
            curve = {str(k): _acc([bon_at(r, k)[vote] for r in records]) for k in budgets}
            full = [bon_at(r, max(budgets))[vote] for r in records]
            out[f"bon_{vote}"] = {"accuracy": _acc(full), "by_difficulty": _by_difficulty(problems, full),
                                  "by_budget": curve}
        out["pass_at_n"] = _acc([any(a["correct"] for a in r["answers"]) for r in records])
    elif method == "mcts":
        ok = [bool((r.get("chosen") or {}).get("correct")) for r in records]
        curve = {str(k): _acc([mcts_at(r, k) for r in records]) for k in budgets}
        out["mcts_ppm"] = {"accuracy": _acc(ok), "by_difficulty": _by_difficulty(problems, ok), "by_budget": curve}
        out["pass_at_n"] = _acc([any(a["correct"] for a in r["answers"]) for r in records])
    else:
        raise ValueError(f"unknown method {method!r}")
    return out


# --------------------------------------------------------------------------- running
def method_config(method: str, n: int, overrides: Sequence[str], *, seed: int, has_ppm: bool) -> Any:
    """The search config of one evaluation method (a preset + the method's overrides)."""
    from rstar.search.config import load_search_config

    if method == "greedy":
        return load_search_config("eval_greedy", [*overrides])
    if method == "bon":
        vote = "ppm" if has_ppm else "majority"
        return load_search_config("eval_bon", [f"n={n}", f"vote={vote}", f"seed={seed}", *overrides])
    if method == "mcts":
        return load_search_config("eval_mcts", [f"rollouts={n}", f"seed={seed}", *overrides])
    raise ValueError(f"unknown method {method!r}")


def evaluate(
    generator: Any,
    scorer: Any,
    problem_sets: dict[str, Sequence[Problem]],
    out_dir: str | Path,
    *,
    methods: Sequence[str] = ("greedy", "bon", "mcts"),
    n: int = 16,
    budgets: Sequence[int] = (1, 2, 4, 8, 16),
    overrides: dict[str, Sequence[str]] | None = None,
    seed: int = 0,
    sandbox: Any = None,
    grader: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``methods`` on every problem set; trees go to ``out_dir/<set>/<method>.jsonl``
    (resumable) and the scores are returned as ``{set: {metric: ...}}``. Methods that need a
    PPM (``mcts``) are skipped when ``scorer`` is None; ``bon`` then votes by majority only."""
    from rstar.search.driver import Searcher

    out = Path(out_dir)
    overrides = overrides or {}
    result: dict[str, Any] = {}
    budgets = sorted({b for b in budgets if 1 <= b <= n} | {n})
    for name, problems in problem_sets.items():
        res: dict[str, Any] = {}
        for method in methods:
            if method == "mcts" and scorer is None:
                logger.info("%s: no PPM, mcts skipped", name)
                continue
            cfg = method_config(method, n, list(overrides.get(method, ())), seed=seed, has_ppm=scorer is not None)
            needs = scorer if (cfg.needs_scorer or (method == "bon" and scorer is not None)) else None
            with Searcher(generator, needs, cfg, sandbox=sandbox, grader=grader) as s:
                results = s.run(list(problems), out / name / f"{method}.jsonl", progress=progress)
            scores = score_records(method, problems, [r.record for r in results], budgets if method != "greedy" else [1])
            tokens = scores.pop("tokens_per_problem")
            scores.pop("problems")
            for key, val in scores.items():
                if isinstance(val, dict):
                    val["tokens_per_problem"] = tokens
                res[key] = val
        res["problems"] = len(problems)
        result[name] = res
        summary = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in res.items() if isinstance(v, dict))
        logger.info("eval %s (%d problems): %s", name, len(problems), summary)
    return result
