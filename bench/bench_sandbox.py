"""Sandbox throughput on typical rStar step programs vs. a fresh interpreter per program.

    PYTHONPATH=. .venv/bin/python bench/bench_sandbox.py [--n 400] [--workers 2]
    PYTHONPATH=. .venv/bin/python -m pytest bench/bench_sandbox.py --benchmark-only

Programs are non-identical (the cache never hits) and most use sympy, as policy steps do:
templated arithmetic, exact sympy arithmetic, and a share of ``sympy.solve`` steps. The
baseline starts ``python -c PROGRAM`` per program (same concurrency as the pool) on a
sample of the same programs, in the same run, so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rstar.sandbox import Sandbox, SandboxConfig, Status  # noqa: E402

log = logging.getLogger("bench_sandbox")


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


def run_pool(programs: list[str], workers: int) -> tuple[float, Sandbox]:
    sb = Sandbox(SandboxConfig(workers=workers, cache_size=0))
    sb.wait_ready(300)
    sb.run_many(["1"] * workers)  # every server up
    t0 = time.perf_counter()
    res = sb.run_many(programs)
    dt = time.perf_counter() - t0
    bad = [r for r in res if r.status is not Status.OK]
    assert not bad, bad[:3]
    return len(programs) / dt, sb


def run_baseline(programs: list[str], workers: int) -> float:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

    def one(p: str) -> None:
        subprocess.run([sys.executable, "-c", p], check=True, capture_output=True, env=env,
                       timeout=600)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, programs))
    return len(programs) / (time.perf_counter() - t0)


def measure(n: int, workers: int, baseline_n: int) -> dict[str, float]:
    progs = step_programs(n)
    pool_rate, sb = run_pool(progs, workers)
    iso = sb.isolation
    sb.close()
    base_rate = run_baseline(step_programs(baseline_n), workers)
    return {"pool_exec_per_s": pool_rate, "baseline_exec_per_s": base_rate,
            "ratio": pool_rate / base_rate, "workers": workers, "n": n,
            "isolation_on": float(bool(iso.get("seccomp") and iso.get("landlock_abi")))}


def _report(m: dict[str, float]) -> str:
    return (f"sandbox pool: {m['pool_exec_per_s']:.1f} exec/s ({int(m['workers'])} workers, "
            f"{int(m['n'])} programs, isolation on={bool(m['isolation_on'])}); fresh "
            f"`python -c` per program: {m['baseline_exec_per_s']:.2f} exec/s; "
            f"ratio {m['ratio']:.0f}x; load average {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} CPUs")


def test_sandbox_throughput(benchmark):  # pytest-benchmark entry point
    workers = len(os.sched_getaffinity(0))
    m = benchmark.pedantic(measure, args=(200, workers, 2 * workers), rounds=1, iterations=1)
    benchmark.extra_info.update(m)
    print("\n" + _report(m))
    assert m["ratio"] > 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--baseline-n", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(_report(measure(args.n, args.workers, args.baseline_n)))


if __name__ == "__main__":
    main()
