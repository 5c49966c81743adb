"""Answer checks per second: rstar.grading.Grader vs plain math_verify, on realistic pairs.

Pairs come from the benchmark golds: each gold against a reformatted equivalent (``\\dfrac``,
``a/b``, decimals, ``\\$``, thousands separators, units, spacing, ``x = ...``, ``\\left``) or
a wrong answer (another problem's gold, or the gold with one digit changed).  Every pair is
distinct, and each Grader run starts with an empty memo, so the cache does not inflate the rate.

    python bench/bench_grading.py [--n 600] [--timeout 5] [--json out.json]
    pytest bench/bench_grading.py            # pytest-benchmark
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rstar.data import load_problems  # noqa: E402
from rstar.grading import Grader  # noqa: E402

logger = logging.getLogger("bench_grading")

BENCH_SETS = ("math500", "gsm8k", "olympiadbench", "aime2024", "amc23", "gaokao2023en")


def _reformat(gold: str, rng: random.Random) -> str:
    """An equivalent spelling of ``gold`` (or ``gold`` with cosmetic changes when no rule applies)."""
    g = gold.strip()
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", g)
    if m:
        s, a, b = m.groups()
        return rng.choice([f"{s}{a}/{b}", f"{s}\\dfrac{{{a}}}{{{b}}}", f"{s}\\frac{{{2 * int(a)}}}{{{2 * int(b)}}}"])
    if re.fullmatch(r"-?\d+", g):
        v = int(g)
        return rng.choice([f"{v}.0", f"\\${v}", f"{v:,}", f"{v} \\text{{ units}}", f"x = {v}", f"{v}.00"])
    if re.fullmatch(r"-?\d*\.\d+", g):
        return rng.choice([g + "0", f"{float(g)}", "\\$" + g])
    r = g.replace("\\frac", "\\dfrac") if "\\frac" in g and rng.random() < 0.5 else g
    r = r.replace("(", "\\left(").replace(")", "\\right)") if "(" in r and rng.random() < 0.5 else r
    r = re.sub(r"([+\-=,])", r" \1 ", r) if rng.random() < 0.7 else r
    if r == g:
        r = "\\left(" + g + "\\right)" if rng.random() < 0.5 and not re.search(r"[,=<>]", g) else " " + g + " "
    return r


def _perturb(gold: str, rng: random.Random) -> str | None:
    digits = [i for i, c in enumerate(gold) if c.isdigit()]
    if not digits:
        return None
    i = rng.choice(digits)
    d = str((int(gold[i]) + rng.randint(1, 9)) % 10)
    return gold[:i] + d + gold[i + 1 :]


def make_pairs(n: int, seed: int = 0, data_dir: str | None = None) -> list[tuple[str, str]]:
    """``n`` distinct (prediction, gold) pairs: ~50% equivalent reformats, ~50% wrong answers."""
    rng = random.Random(seed)
    golds: list[str] = []
    for name in BENCH_SETS:
        golds += [p.answer for p in load_problems(name, data_dir=data_dir)
                  if p.answer and len(p.answers) == 1 and len(p.answer) < 200]
    rng.shuffle(golds)
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    i = 0
    while len(pairs) < n and i < 50 * n:
        gold = golds[i % len(golds)]
        i += 1
        kind = rng.random()
        if kind < 0.5:
            pred = _reformat(gold, rng)
        elif kind < 0.75:
            pred = _perturb(gold, rng) or rng.choice(golds)
        else:
            pred = rng.choice(golds)
        pred = f"The final answer is $\\boxed{{{pred}}}$."
        if (pred, gold) in seen or pred == gold:
            continue
        seen.add((pred, gold))
        pairs.append((pred, gold))
    return pairs


def run_grader(pairs: list[tuple[str, str]], timeout_s: float = 5.0) -> dict:
    """One cold-cache pass, one check at a time (latency of every check is recorded)."""
    with Grader(timeout_s=timeout_s, workers=1) as g:
        g._get_pool().warm_up()  # worker start-up is a one-off; not part of the per-check rate
        lat = []
        results = []
        t0 = time.perf_counter()
        for pred, gold in pairs:
            t = time.perf_counter()
            results.append(g.is_equiv(pred, gold))
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        stats = g.stats
    return {
        "checks": len(pairs),
        "seconds": wall,
        "checks_per_s": len(pairs) / wall,
        "max_latency_s": max(lat),
        "p50_latency_ms": 1000 * statistics.median(lat),
        "p99_latency_ms": 1000 * sorted(lat)[int(0.99 * (len(lat) - 1))],
        "fast_or_cached": stats.fast + stats.cache_hits,
        "symbolic": stats.symbolic,
        "timeouts": stats.timeouts,
        "results": results,
    }


def run_plain_math_verify(pairs: list[tuple[str, str]]) -> dict:
    """The baseline: ``verify(parse(\\boxed{gold}), parse(pred))`` in this (main) thread."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    parse("\\boxed{1}")
    verify(parse("\\boxed{1/2}"), parse("0.5"))  # import/initialisation outside the timing
    results = []
    lat = []
    t0 = time.perf_counter()
    for pred, gold in pairs:
        t = time.perf_counter()
        results.append(bool(verify(parse("\\boxed{" + gold + "}"), parse(pred))))
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"checks": len(pairs), "seconds": wall, "checks_per_s": len(pairs) / wall,
            "max_latency_s": max(lat), "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="number of distinct pairs")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-check timeout of the Grader (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    pairs = make_pairs(args.n, args.seed, args.data_dir)
    mv = run_plain_math_verify(pairs)
    gr = run_grader(pairs, args.timeout)
    agree = sum(a == b for a, b in zip(gr["results"], mv["results"])) / len(pairs)
    out = {
        "pairs": len(pairs),
        "grader_checks_per_s": round(gr["checks_per_s"], 1),
        "math_verify_checks_per_s": round(mv["checks_per_s"], 1),
        "ratio": round(gr["checks_per_s"] / mv["checks_per_s"], 2),
        "grader_max_latency_s": round(gr["max_latency_s"], 3),
        "grader_p50_latency_ms": round(gr["p50_latency_ms"], 3),
        "grader_p99_latency_ms": round(gr["p99_latency_ms"], 1),
        "math_verify_max_latency_s": round(mv["max_latency_s"], 3),
        "timeout_s": args.timeout,
        "decided_without_math_verify": gr["fast_or_cached"],
        "symbolic_checks": gr["symbolic"],
        "timeouts": gr["timeouts"],
        "grader_equal_rate": round(sum(gr["results"]) / len(pairs), 3),
        "math_verify_equal_rate": round(sum(mv["results"]) / len(pairs), 3),
        "agreement_with_math_verify": round(agree, 3),
    }
    for k, v in out.items():
        print(f"{k:32s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    ok = out["grader_max_latency_s"] <= args.timeout + 0.5
    if not ok:
        print("FAIL: a check exceeded its timeout", file=sys.stderr)
    return 0 if ok else 1


# ---- pytest-benchmark -----------------------------------------------------------------------
def _bench_pairs() -> list[tuple[str, str]]:
    return make_pairs(200, seed=1)


def test_bench_grader(benchmark) -> None:  # type: ignore[no-untyped-def]
    pairs = _bench_pairs()
    grader = Grader(timeout_s=5.0, workers=1)
    grader._get_pool().warm_up()

    def one_pass() -> list[bool]:
        grader._cache.clear()
        return [grader.is_equiv(p, g) for p, g in pairs]

    try:
        res = benchmark.pedantic(one_pass, rounds=3, iterations=1)
    finally:
        grader.close()
    assert len(res) == len(pairs)
    assert grader.stats.max_symbolic_s <= 5.0 + 0.5


def test_bench_plain_math_verify(benchmark) -> None:  # type: ignore[no-untyped-def]
    from math_verify import parse, verify

    pairs = _bench_pairs()

    def one_pass() -> list[bool]:
        return [bool(verify(parse("\\boxed{" + g + "}"), parse(p))) for p, g in pairs]

    res = benchmark.pedantic(one_pass, rounds=1, iterations=1)
    assert len(res) == len(pairs)


if __name__ == "__main__":
    sys.exit(main())
