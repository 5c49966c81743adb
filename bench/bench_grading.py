"""Answer checks per second: rstar.grading.Grader vs plain math_verify, on realistic pairs.

Pairs come from the benchmark golds: each gold against a reformatted equivalent (``\\dfrac``,
``a/b``, decimals, ``\\$``, thousands separators, units, spacing, ``x = ...``, ``\\left``) or
a wrong answer (another problem's gold, or the gold with one digit changed).  Every pair is
distinct, and each Grader run starts with empty memos (checks, cleaned strings, parsed answers),
so caches do not inflate the rate.  The gold mix follows the benchmark files (numeric golds about
85%); the output says what share of the checks the fast path decides.  Worker start-up (imports
and the parser warm-up) is timed separately, outside the per-check rate.

    python bench/bench_grading.py [--n 600] [--timeout 5] [--ablate] [--search 75] [--json out.json]
    pytest bench/bench_grading.py            # pytest-benchmark
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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


def _bench_golds(data_dir: str | None) -> list[str]:
    """The single, short gold answers of the benchmark sets, in file order."""
    golds: list[str] = []
    for name in BENCH_SETS:
        golds += [p.answer for p in load_problems(name, data_dir=data_dir)
                  if p.answer and len(p.answers) == 1 and len(p.answer) < 200]
    return golds


def _candidate(gold: str, golds: list[str], rng: random.Random, *, reformat_below: float,
               perturb_below: float) -> str:
    """A model-style final answer to check against ``gold``: an equivalent reformat, a
    perturbed (wrong) value, or another problem's gold, by one draw of ``rng``."""
    kind = rng.random()
    if kind < reformat_below:
        pred = _reformat(gold, rng)
    elif kind < perturb_below:
        pred = _perturb(gold, rng) or rng.choice(golds)
    else:
        pred = rng.choice(golds)
    return f"The final answer is $\\boxed{{{pred}}}$."


def make_pairs(n: int, seed: int = 0, data_dir: str | None = None) -> list[tuple[str, str]]:
    """``n`` distinct (prediction, gold) pairs: ~50% equivalent reformats, ~50% wrong answers."""
    rng = random.Random(seed)
    golds = _bench_golds(data_dir)
    rng.shuffle(golds)
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    i = 0
    while len(pairs) < n and i < 50 * n:
        gold = golds[i % len(golds)]
        i += 1
        pred = _candidate(gold, golds, rng, reformat_below=0.5, perturb_below=0.75)
        if (pred, gold) in seen or pred == gold:
            continue
        seen.add((pred, gold))
        pairs.append((pred, gold))
    return pairs


def make_search_workload(golds_n: int, per_gold: int, seed: int = 0,
                         data_dir: str | None = None) -> list[tuple[str, str]]:
    """Search-like checks: ``golds_n`` golds, each against ``per_gold`` distinct candidates
    (reformats, perturbations, other golds), in problem order, like terminal-answer grading."""
    rng = random.Random(seed + 1000)
    golds = _bench_golds(data_dir)
    rng.shuffle(golds)
    out: list[tuple[str, str]] = []
    used: set[str] = set()
    for gold in golds:
        if len(used) == golds_n:
            break
        if gold in used:
            continue  # each problem's gold once: all checks stay distinct
        used.add(gold)
        cands: list[str] = []
        tries = 0
        while len(cands) < per_gold and tries < 50 * per_gold:
            tries += 1
            pred = _candidate(gold, golds, rng, reformat_below=0.4, perturb_below=0.7)
            if pred not in cands:
                cands.append(pred)
        out += [(c, gold) for c in cands]
    return out


def _gold_mix(pairs: list[tuple[str, str]]) -> dict:
    """What the workload is made of: numeric golds, and where each check is decided."""
    from rstar.grading.grader import _fast, _prep
    from rstar.grading.normalize import parse_number

    numeric = sum(parse_number(_prep(g)[1]) is not None for _, g in pairs)
    fast = 0
    for p, g in pairs:
        pc, pn = _prep(p)
        gc, gn = _prep(g)
        fast += _fast(pc, pn, gc, gn, symmetric=False) is not None
    _prep.cache_clear()
    return {"numeric_gold_share": round(numeric / len(pairs), 3), "fast_path_share": round(fast / len(pairs), 3)}


def _proc_cpu_s(pid: int) -> float | None:
    """User+system CPU seconds of a process (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _workers_cpu_s(g: Grader) -> float | None:
    pool = g._pool
    if pool is None:
        return None
    vals = [_proc_cpu_s(w.proc.pid) if w.proc is not None else None for w in pool._all]
    return None if any(v is None for v in vals) else sum(vals)  # type: ignore[arg-type]


def run_grader(pairs: list[tuple[str, str]], timeout_s: float = 5.0, symbolic: str = "fast",
               parser_warmup: bool = True) -> dict:
    """One cold-cache pass, one check at a time (latency of every check is recorded)."""
    from rstar.grading.grader import _prep

    _prep.cache_clear()  # the parent's memo of cleaned strings starts empty too
    with Grader(timeout_s=timeout_s, workers=1, symbolic=symbolic, parser_warmup=parser_warmup) as g:
        t_start = time.perf_counter()
        # Worker start-up (imports, and the parser warm-up when on) is a one-off per process, not
        # part of the per-check rate; it is reported separately.
        warm = g._get_pool().warm_up(parser=True)
        startup_s = time.perf_counter() - t_start
        lat = []
        results = []
        w0, c0 = _workers_cpu_s(g), time.process_time()
        t0 = time.perf_counter()
        for pred, gold in pairs:
            t = time.perf_counter()
            results.append(g.is_equiv(pred, gold))
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t0
        w1, c1 = _workers_cpu_s(g), time.process_time()
        cpu = (c1 - c0) + (w1 - w0) if w0 is not None and w1 is not None else None
        stats = g.stats
    slowest = sorted(range(len(pairs)), key=lambda i: -lat[i])[:3]
    return {
        "checks": len(pairs),
        "seconds": wall,
        "checks_per_s": len(pairs) / wall,
        "checks_per_cpu_s": len(pairs) / cpu if cpu else None,
        "max_latency_s": max(lat),
        "p50_latency_ms": 1000 * statistics.median(lat),
        "p99_latency_ms": 1000 * sorted(lat)[int(0.99 * (len(lat) - 1))],
        "fast_or_cached": stats.fast + stats.cache_hits,
        "symbolic": stats.symbolic,
        "timeouts": stats.timeouts,
        "results": results,
        "startup_s": startup_s,
        "parser_warmup_s": sum(w[1] for w in warm),
        "slowest": [(round(lat[i], 3), pairs[i][1][:40]) for i in slowest],
    }


def run_plain_math_verify(pairs: list[tuple[str, str]], gold_once: bool = False) -> dict:
    """The baseline: ``verify(parse(\\boxed{gold}), parse(pred))`` in this (main) thread.

    With ``gold_once``, a gold is parsed once for its run of consecutive checks (the best plain
    usage in search, where one gold meets many candidates)."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    parse("\\boxed{1}")
    verify(parse("\\boxed{1/2}"), parse("0.5"))  # import/initialisation outside the timing
    results = []
    lat = []
    last_gold, parsed_gold = None, None
    c0 = time.process_time()
    t0 = time.perf_counter()
    for pred, gold in pairs:
        t = time.perf_counter()
        if not gold_once or gold != last_gold:
            parsed_gold = parse("\\boxed{" + gold + "}")
            last_gold = gold
        results.append(bool(verify(parsed_gold, parse(pred))))
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"checks": len(pairs), "seconds": wall, "checks_per_s": len(pairs) / wall,
            "checks_per_cpu_s": len(pairs) / cpu if cpu > 0 else None,
            "max_latency_s": max(lat), "results": results}


def run_plain_math_verify_isolated(pairs: list[tuple[str, str]], warm_corpus: bool) -> dict:
    """:func:`run_plain_math_verify` in a fresh interpreter; with ``warm_corpus``, after parsing
    the worker's warm-up corpus there (plain math-verify, warmed the way the grader's worker is)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pairs.json"
        src.write_text(json.dumps(pairs))
        cmd = [sys.executable, __file__, "--_baseline", str(src)] + (["--_warm"] if warm_corpus else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _baseline_main(path: str, warm: bool) -> int:
    pairs = [tuple(p) for p in json.loads(Path(path).read_text())]
    if warm:
        from rstar.grading import symbolic

        symbolic.warm_up(budget_s=120)  # symbolic.install() not called: plain LL parsing
    print(json.dumps(run_plain_math_verify(pairs)))  # type: ignore[arg-type]
    return 0


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def _summary(pairs: list[tuple[str, str]], gr: dict, mv: dict, timeout_s: float) -> dict:
    agree = sum(a == b for a, b in zip(gr["results"], mv["results"])) / len(pairs)
    return {
        "pairs": len(pairs),
        "distinct_pairs": len(set(pairs)),
        "grader_checks_per_s": round(gr["checks_per_s"], 1),
        "math_verify_checks_per_s": round(mv["checks_per_s"], 1),
        "ratio": round(gr["checks_per_s"] / mv["checks_per_s"], 2),
        "grader_checks_per_cpu_s": _r(gr["checks_per_cpu_s"]),
        "math_verify_checks_per_cpu_s": _r(mv["checks_per_cpu_s"]),
        "ratio_cpu": _r(gr["checks_per_cpu_s"] / mv["checks_per_cpu_s"]
                        if gr["checks_per_cpu_s"] and mv["checks_per_cpu_s"] else None, 2),
        "grader_max_latency_s": round(gr["max_latency_s"], 3),
        "grader_p50_latency_ms": round(gr["p50_latency_ms"], 3),
        "grader_p99_latency_ms": round(gr["p99_latency_ms"], 1),
        "math_verify_max_latency_s": round(mv["max_latency_s"], 3),
        "timeout_s": timeout_s,
        "decided_without_math_verify": gr["fast_or_cached"],
        "symbolic_checks": gr["symbolic"],
        "timeouts": gr["timeouts"],
        "worker_startup_s": round(gr["startup_s"], 2),
        "parser_warmup_s": round(gr["parser_warmup_s"], 2),
        "grader_equal_rate": round(sum(gr["results"]) / len(pairs), 3),
        "math_verify_equal_rate": round(sum(mv["results"]) / len(pairs), 3),
        "agreement_with_math_verify": round(agree, 3),
        "slowest_checks": gr["slowest"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="number of distinct pairs")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-check timeout of the Grader (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--search", type=int, default=0, metavar="GOLDS",
                    help="also run the search-like workload: GOLDS golds x --per-gold candidates")
    ap.add_argument("--per-gold", type=int, default=8)
    ap.add_argument("--ablate", action="store_true",
                    help="also time the grader with plain math-verify workers, and without parser warm-up")
    ap.add_argument("--quick", action="store_true", help="200 pairs (for `rstar bench grading --quick`)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--_baseline", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_warm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._baseline:
        return _baseline_main(args._baseline, args._warm)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    n = 200 if args.quick else args.n

    pairs = make_pairs(n, args.seed, args.data_dir)
    mv = run_plain_math_verify(pairs)
    gr = run_grader(pairs, args.timeout)
    out = _gold_mix(pairs)  # after the timed runs, which must not find anything warmed by it
    out.update(_summary(pairs, gr, mv, args.timeout))
    if args.ablate:
        for name, kw in (("plain_workers", {"symbolic": "plain"}), ("no_parser_warmup", {"parser_warmup": False})):
            ab = run_grader(pairs, args.timeout, **kw)
            out[f"ablation_{name}_checks_per_s"] = round(ab["checks_per_s"], 1)
            out[f"ablation_{name}_ratio"] = round(ab["checks_per_s"] / mv["checks_per_s"], 2)
        for name, warm in (("fresh_process", False), ("warmed_same_corpus", True)):
            b = run_plain_math_verify_isolated(pairs, warm)
            out[f"ablation_math_verify_{name}_checks_per_s"] = round(b["checks_per_s"], 1)
            out[f"ablation_grader_vs_math_verify_{name}"] = round(gr["checks_per_s"] / b["checks_per_s"], 2)
    if args.search:
        sp = make_search_workload(args.search, args.per_gold, args.seed, args.data_dir)
        smv = run_plain_math_verify(sp, gold_once=True)
        sgr = run_grader(sp, args.timeout)
        smix = _gold_mix(sp)
        ssum = _summary(sp, sgr, smv, args.timeout)
        for k in ("pairs", "distinct_pairs", "grader_checks_per_s", "math_verify_checks_per_s", "ratio",
                  "ratio_cpu", "grader_max_latency_s", "symbolic_checks", "agreement_with_math_verify"):
            out[f"search_{k}"] = ssum[k]
        out["search_fast_path_share"] = smix["fast_path_share"]
    for k, v in out.items():
        print(f"{k:36s} {v}")
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
    from rstar.grading.grader import _prep

    pairs = _bench_pairs()
    grader = Grader(timeout_s=5.0, workers=1)
    grader._get_pool().warm_up(parser=True)

    def one_pass() -> list[bool]:
        grader._cache.clear()  # every round cold: check memo, cleaned strings, parsed answers
        _prep.cache_clear()
        grader._get_pool().clear_caches()
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
