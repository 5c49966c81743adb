"""Sandbox throughput on rStar step programs: reuse mode, strict mode, the in-process
ceiling (no sandbox at all) and a fresh interpreter per program, all in one run.

    PYTHONPATH=. .venv/bin/python bench/bench_sandbox.py [--n 400] [--workers 2] [--repeat 3] [--quick]
    PYTHONPATH=. .venv/bin/python -m pytest bench/bench_sandbox.py --benchmark-only

Two program mixes, both non-identical programs (the cache never hits):

* ``bench``: this benchmark's historical mix (:func:`step_programs`): 1/10 ``sympy.solve`` of
  a quadratic, 1/2 sympy ``Rational``/``sqrt``/``simplify``, the rest loops and arithmetic.
* ``typical``: :func:`rstar.sandbox._corpus.typical_steps`, every prefix of 22 hand-written
  solutions in the policy's step format (about 40 % sympy, 18 % ``solve``, 12 % numpy; see
  that module for why this mix).

For each mix: exec/s through the pool in reuse mode and in strict mode (``workers``
servers, isolation on), the in-process ceiling (``workers`` preloaded, warmed-up Python
processes that ``exec`` the same programs in fresh globals, no isolation, no fork), and
the baseline: ``python -c PROGRAM`` per program (same concurrency) on an evenly spaced
sample of the same programs. Every figure comes from the same run, so ratios compare like with like;
the load average is printed with them (other jobs share the machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rstar.sandbox import Sandbox, SandboxConfig, Status  # noqa: E402
from rstar.sandbox._corpus import typical_steps  # noqa: E402

log = logging.getLogger("bench_sandbox")
_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def step_programs(n: int, solve_every: int = 10) -> list[str]:
    """Cumulative-code-block style programs; every ``solve_every``-th runs sympy.solve."""
    progs = []
    for i in range(n):
        a, b = i % 97 + 2, i % 13 + 1
        if i % solve_every == 0:
            progs.append(f"from sympy import symbols, solve\nx = symbols('x')\n"
                         f"roots = solve(x**2 - {a + b}*x + {a * b}, x)\nprint(roots)")
        elif i % 2:
            progs.append(f"from sympy import Rational, sqrt, simplify\n"
                         f"r = Rational({a}, {b}) + Rational(1, {a})\n"
                         f"print(r, simplify(sqrt({a * a * b})))")
        else:
            progs.append(f"total = 0\nfor k in range(1, {a}):\n    total += k * {b}\n"
                         f"avg = total / {a}\nprint(total, round(avg, 4))")
    return progs


MIXES = {"bench": step_programs, "typical": typical_steps}


# ------------------------------------------------------------------------------- the pool

def start_pool(workers: int, strict: bool) -> Sandbox:
    sb = Sandbox(SandboxConfig(workers=workers, cache_size=0, fresh_process_per_run=strict))
    sb.wait_ready(300)
    sb.run_many([f"{i}" for i in range(4 * workers)])  # every server up
    return sb


def run_pool(sb: Sandbox, programs: list[str]) -> tuple[float, dict[str, int]]:
    before = dict(sb.stats)
    t0 = time.perf_counter()
    res = sb.run_many(programs)
    dt = time.perf_counter() - t0
    bad = [r for r in res if r.status is not Status.OK]
    assert not bad, bad[:3]
    delta = {k: v - before.get(k, 0) for k, v in sb.stats.items() if v != before.get(k, 0)}
    return len(programs) / dt, delta


# ---------------------------------------------------------------------- in-process ceiling

def _preload() -> None:
    os.environ.update(_ENV)
    from rstar.sandbox import _server

    import numpy  # noqa: F401
    import scipy  # noqa: F401
    import sympy  # noqa: F401

    for src in (_server.WARMUP_SYMPY, _server.WARMUP_NUMPY, _server.WARMUP_SCIPY):
        exec(compile(src, "<warmup>", "exec"), {})


def _ready(_: int) -> int:
    time.sleep(0.3)  # long enough that every worker takes one
    return os.getpid()


def _exec_chunk(programs: list[str]) -> int:
    ok = 0
    for p in programs:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(p, "<string>", "exec"), {"__name__": "__main__"})
            ok += 1
        except Exception:  # noqa: BLE001
            pass
    return ok


def run_inprocess(programs: list[str], workers: int) -> float:
    """``workers`` warmed-up processes exec the programs (fresh globals, no sandbox)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_preload) as pool:
        pool.map(_ready, range(workers), chunksize=1)
        chunks = [programs[i::workers] for i in range(workers)]
        t0 = time.perf_counter()
        done = sum(pool.map(_exec_chunk, chunks, chunksize=1))
        dt = time.perf_counter() - t0
    assert done == len(programs)
    return len(programs) / dt


# ------------------------------------------------------------------------------ baseline

def run_baseline(programs: list[str], workers: int) -> float:
    env = {**os.environ, **_ENV}

    def one(p: str) -> None:
        subprocess.run([sys.executable, "-c", p], check=True, capture_output=True, env=env,
                       timeout=600)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, programs))
    return len(programs) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- reporting

def measure(n: int, workers: int, baseline_n: int, mixes: tuple[str, ...] = tuple(MIXES),
            repeat: int = 1) -> dict[str, Any]:
    """All figures for each mix; with ``repeat`` > 1 the pool and ceiling figures are
    measured that many times, interleaved, and the median is reported. Each repetition
    uses its own ``n`` programs of the mix (a reused child must not find the previous
    repetition's results in sympy's cache)."""
    out: dict[str, Any] = {"workers": workers, "n": n, "load": [], "mixes": {}}
    pools = {mode: start_pool(workers, mode == "strict") for mode in ("reuse", "strict")}
    try:
        iso = pools["reuse"].isolation
        out["isolation_on"] = bool(iso.get("seccomp") and iso.get("landlock_abi"))
        for mix in mixes:
            every = MIXES[mix](n * repeat)
            runs: dict[str, list[float]] = {"reuse": [], "strict": [], "ceiling": []}
            stats: dict[str, dict[str, int]] = {}
            for r in range(repeat):
                progs = every[r * n:(r + 1) * n]
                out["load"].append(os.getloadavg()[0])
                for mode in ("reuse", "strict"):
                    rate, stats[mode] = run_pool(pools[mode], progs)
                    runs[mode].append(rate)
                runs["ceiling"].append(run_inprocess(progs, workers))
            m = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
            m["runs"] = runs
            m["baseline"] = run_baseline(progs[::max(1, n // baseline_n)][:baseline_n], workers)
            m["reuse_stats"] = stats["reuse"]
            out["mixes"][mix] = m
    finally:
        for sb in pools.values():
            sb.close()
    out["load"].append(os.getloadavg()[0])
    return out


def report(m: dict[str, Any]) -> str:
    lines = [f"sandbox, {m['workers']} workers, {m['n']} programs per mix, isolation on="
             f"{m['isolation_on']}, load average {min(m['load']):.1f}-{max(m['load']):.1f} "
             f"on {os.cpu_count()} CPUs"]
    for mix, x in m["mixes"].items():
        st = x["reuse_stats"]
        lines.append(
            f"  {mix:8s} reuse {x['reuse']:7.1f} exec/s ({x['reuse'] / x['ceiling']:.0%} of "
            f"ceiling; {st.get('children_forked', 0)} forks, recycled {st.get('recycled', 0)}: "
            + ", ".join(f"{k[9:]} {v}" for k, v in sorted(st.items())
                        if k.startswith("recycled_"))
            + f") | strict {x['strict']:6.1f} ({x['strict'] / x['ceiling']:.0%}) | in-process "
            f"ceiling {x['ceiling']:7.1f} | fresh python -c {x['baseline']:.2f} | reuse/strict "
            f"{x['reuse'] / x['strict']:.1f}x, reuse/python -c {x['reuse'] / x['baseline']:.0f}x")
        if len(x["runs"]["reuse"]) > 1:
            lines.append("           runs: " + "; ".join(
                f"{k} " + " ".join(f"{v:.0f}" for v in vals) for k, vals in x["runs"].items()))
    return "\n".join(lines)


def test_sandbox_throughput(benchmark):  # pytest-benchmark entry point
    workers = len(os.sched_getaffinity(0))
    m = benchmark.pedantic(measure, args=(200, workers, 2 * workers), rounds=1, iterations=1)
    for mix, x in m["mixes"].items():
        for k in ("reuse", "strict", "ceiling", "baseline"):
            benchmark.extra_info[f"{mix}_{k}_exec_per_s"] = x[k]
    benchmark.extra_info["load"] = max(m["load"])
    print("\n" + report(m))
    for x in m["mixes"].values():
        assert x["reuse"] > x["baseline"] and x["strict"] > x["baseline"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--baseline-n", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--mix", choices=tuple(MIXES), action="append")
    ap.add_argument("--quick", action="store_true", help="100 programs, 4 for the baseline")
    args = ap.parse_args()
    if args.quick:
        args.n, args.baseline_n = 100, 4
    logging.basicConfig(level=logging.INFO)
    m = measure(args.n, args.workers, args.baseline_n, tuple(args.mix or MIXES), args.repeat)
    print(report(m))


if __name__ == "__main__":
    main()
