"""Scale-out on Ray: problems per second with 1 and 2 actors against one process, and what
the Ray path costs per problem (dispatch, serialisation, streaming back, writing).

Standalone (starts a local Ray cluster with 2 CPUs):
    python bench/bench_distributed.py                     # tiny model + instant fake search
    python bench/bench_distributed.py --problems 48 --json out.json
pytest-benchmark:
    pytest bench/bench_distributed.py --benchmark-only

Workloads (same problems, same config, same seeds in every mode):

* ``tiny``: the tiny local Qwen2 policy (HF backend, 1 torch thread per process, as each
  1-CPU actor), round2-style MCTS in lock-step. Rates are over the search phase: Ray runs
  hand out their first batch once every actor is up (``min_ready_actors``) and stop the
  clock at the last record; the single process is timed around ``Searcher.run`` with its
  model loaded. Actor start-up (imports, model loading) is reported on its own row.
* ``fake``: a stand-in generator, sandbox and grader that cost ~nothing, so the search of a
  problem takes a few ms; the gap between one actor and one process is the Ray path's own
  cost per problem.

Besides wall-clock rates, every mode reports CPU time over the search phase, split into the
searching processes (the local process, or the actors, each with its sandbox and grader
processes), the Ray driver and Ray's own daemons: CPU stays meaningful on a shared machine,
where wall time does not.

Also measured: the round trip of one realistic record (an MCTS tree of 2,000 nodes) through
an actor, and the pickling of that record alone."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO), str(BENCH)]

logger = logging.getLogger("bench_distributed")


# ------------------------------------------------------------------ workloads
def fake_factory(job: Any) -> Any:
    """Components for the ``fake`` workload (imported by the actors from bench/)."""
    from bench_search import InstantSandbox, LatencyGenerator, StrGrader

    from rstar.distributed import SearchComponents

    return SearchComponents(LatencyGenerator(0.0, 0.0, 16), None, InstantSandbox(), StrGrader())


def _problems(n: int) -> list[Any]:
    from rstar.data import load_problems

    data = Path(os.environ.get("RSTAR_DATA_DIR", REPO.parent / "shared" / "data")) / "math500_test.json"
    if data.is_file():
        return load_problems(data, limit=n)
    from rstar.data import Problem

    return [Problem(f"q{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(n)]


def tiny_job() -> Any:
    from rstar.config import from_dict, to_dict
    from rstar.distributed import SearchJob
    from rstar.search.config import SearchConfig, load_search_config
    from rstar.testing import build_tiny_model

    cache = Path(os.environ.get("RSTAR_TEST_CACHE", REPO / ".cache" / "tests"))
    model = build_tiny_model(cache / "tiny-qwen2")
    d = to_dict(load_search_config("round2"))
    d.update(n=4, rollouts=4, max_depth=4, concurrent_trees=4, pipeline="lockstep", seed=5)
    d["generation"]["max_new_tokens"] = 48
    d["sandbox"] = {"workers": 1}
    return SearchJob(model=str(model), config=from_dict(SearchConfig, d), torch_threads=1)


def fake_job() -> Any:
    from rstar.distributed import SearchJob
    from rstar.search.config import SearchConfig

    cfg = SearchConfig(mode="mcts", value="terminal", n=4, rollouts=4, max_depth=6, concurrent_trees=64,
                       pipeline="lockstep")
    return SearchJob(model="-", config=cfg, factory="bench_distributed:fake_factory")


def synthetic_record(nodes: int = 2000) -> dict[str, Any]:
    """A record shaped like a real MCTS tree of ``nodes`` nodes (~80-token steps)."""
    step = "x = sympy.Rational(3, 7) * y + 2\nprint(x)\n<end_of_step>" * 3
    return {
        "id": "bench/0", "question": "Q" * 300, "answer": "3/7", "source": "bench", "mode": "mcts", "config": {},
        "nodes": [{"id": i, "parent": (i - 1) // 12 if i else -1, "depth": 0, "text": step, "visits": 3, "q": 0.25,
                   "value": None, "reward": None, "terminal": False, "valid": True, "reason": None, "kind": "code",
                   "answer": None, "correct": None, "exec_ok": True, "exec_status": "ok", "errors": 0}
                  for i in range(nodes)],
        "answers": [], "chosen": {"answer": None, "node": None, "correct": None},
        "stats": {"nodes": nodes, "tokens": 0, "execs": 0, "expansions": 0, "rollouts": 0, "seconds": 0.0},
    }


# ------------------------------------------------------------------ measurements
def cpu_snapshot() -> dict[int, tuple[float, int, str]]:
    """pid -> (CPU seconds so far, parent pid, command line) for this process and every
    descendant (for a local Ray cluster started here: GCS, raylet, workers, actors and their
    sandbox / grader processes)."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.system, p.ppid(), " ".join(p.cmdline())[:200])
        except psutil.Error:
            pass
    return out


def cpu_split(s0: dict[int, tuple[float, int, str]], s1: dict[int, tuple[float, int, str]],
              actor_pids: set[int]) -> dict[str, float]:
    """CPU seconds between two snapshots, split into ``driver`` (this process and its own
    sandbox / grader children), ``actors`` (the actors and their children) and ``system``
    (Ray's daemons and idle workers). Processes gone by ``s1`` are not counted."""
    me = os.getpid()
    parent = {pid: v[1] for pid, v in s1.items()}
    out = {"driver": 0.0, "actors": 0.0, "system": 0.0}
    for pid, (cpu, _, cmd) in s1.items():
        delta = cpu - s0.get(pid, (0.0, 0, ""))[0]
        node, kind, seen = pid, None, set()
        while node in parent and node not in seen:
            if node in actor_pids:
                kind = "actors"
                break
            if node == me:
                kind = "driver" if pid == me or "rstar.sandbox" in cmd or "rstar.grading" in cmd else "system"
                break
            seen.add(node)
            node = parent[node]
        out[kind or "system"] += delta
    return out


def run_local_timed(job: Any, problems: list[Any]) -> dict[str, Any]:
    from rstar.distributed import build_components, run_local

    t0 = time.perf_counter()
    comps = build_components(job)
    if comps.sandbox is None:  # kept for the whole run, as in an actor (so its CPU is counted)
        from rstar.sandbox import Sandbox, SandboxConfig

        comps.sandbox = Sandbox(SandboxConfig(**job.config.sandbox))
    if comps.grader is None:
        from rstar.grading import Grader

        comps.grader = Grader()
    setup = time.perf_counter() - t0
    try:
        run_local(job, problems[:2], None, progress=False, components=comps)  # warm: sandbox, first batches
        c0, t0 = cpu_snapshot(), time.perf_counter()
        res = run_local(job, problems, None, progress=False, components=comps)
        wall, cpu = time.perf_counter() - t0, cpu_split(c0, cpu_snapshot(), set())
    finally:
        comps.close()
    return {"mode": "local", "problems": len(res), "wall_s": wall, "rate": len(res) / wall, "startup_s": setup,
            "cpu": cpu}


def run_ray_timed(job: Any, problems: list[Any], actors: int, batch_size: int | None = None) -> dict[str, Any]:
    """Ray with ``actors`` actors; the first batch waits for all of them (min_ready_actors),
    so the rate is over the search phase with every actor up."""
    from rstar.distributed.ray_runner import RayRunner

    snaps: dict[str, Any] = {}
    pids: set[int] = set()
    seen = [0]

    def hook(kind: str, info: dict[str, Any]) -> None:  # CPU snapshots around the search phase
        if kind == "actor_ready":
            pids.add(int(info["pid"]))
        elif kind == "batch" and "start" not in snaps:
            snaps["start"] = cpu_snapshot()
        elif kind == "record":
            seen[0] += 1
            if seen[0] == len(problems):
                snaps["end"] = cpu_snapshot()  # before the actors are closed and killed

    runner = RayRunner(job, num_actors=actors, batch_size=batch_size, min_ready_actors=actors, on_event=hook)
    res = runner.run(problems, None, progress=False)
    st = runner.stats
    return {"mode": f"ray x{actors}", "problems": len(res), "wall_s": st.wall_s, "search_s": st.search_s,
            "rate": len(res) / st.search_s, "startup_s": st.startup_s, "batches": st.batches,
            "deaths": st.actor_deaths, "cpu": cpu_split(snaps["start"], snaps["end"], pids)}


def round_trip(nodes: int = 2000, reps: int = 20) -> dict[str, Any]:
    import ray

    from rstar.distributed.ray_runner import SearchWorker

    rec = synthetic_record(nodes)
    size = len(json.dumps(rec))
    t0 = time.perf_counter()
    for _ in range(reps):
        pickle.loads(pickle.dumps(rec, protocol=5))
    pick = (time.perf_counter() - t0) / reps

    class _Echo:  # a worker with no model: only the transport is measured
        def echo(self, payload: Any = None) -> Any:
            return payload

    actor = ray.remote(num_cpus=0)(_Echo).remote()
    ray.get(actor.echo.remote(None))
    t0 = time.perf_counter()
    for _ in range(reps):
        ray.get(actor.echo.remote(rec))
    rt = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        ray.get(actor.echo.remote(None))
    empty = (time.perf_counter() - t0) / reps
    ray.kill(actor)
    assert SearchWorker.echo  # the workers expose the same probe
    return {"nodes": nodes, "json_bytes": size, "pickle_s": pick, "round_trip_s": rt, "empty_call_s": empty}


def run_all(problems_n: int, workloads: list[str]) -> dict[str, Any]:
    import ray

    own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     x for x in (str(BENCH), str(REPO), os.environ.get("PYTHONPATH", "")) if x)}})
    out: dict[str, Any] = {"problems": problems_n, "cpus": os.cpu_count(), "workloads": {}}
    try:
        for w in workloads:
            job = tiny_job() if w == "tiny" else fake_job()
            n = problems_n if w == "tiny" else problems_n * 20
            probs = _problems(n)
            rows = [run_local_timed(job, probs)]
            rows.append(run_ray_timed(job, probs, 1))  # default batches: two per actor
            rows.append(run_ray_timed(job, probs, 2))
            out["workloads"][w] = rows
        out["round_trip"] = round_trip()
    finally:
        if own:
            ray.shutdown()
    return out


def rows_for_report(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: figure, config, value, unit, ratio (vs the in-run baseline), baseline."""
    rows = []
    for w, runs in res["workloads"].items():
        local = runs[0]
        for r in runs:
            rows.append({"figure": f"problems/s ({w})", "config": r["mode"], "value": r["rate"], "unit": "problems/s",
                         "ratio": r["rate"] / local["rate"], "baseline": "single process, same run"})
        lc = local["cpu"]["driver"] / local["problems"]
        for r in runs:
            c = r["cpu"]
            if r is local:
                rows.append({"figure": f"search CPU per problem ({w})", "config": "local", "value": lc * 1e3,
                             "unit": "CPU ms/problem", "ratio": 1.0, "baseline": "process + its sandbox, grader"})
                continue
            rows.append({"figure": f"search CPU per problem ({w})", "config": f"{r['mode']}: actors",
                         "value": c["actors"] / r["problems"] * 1e3, "unit": "CPU ms/problem",
                         "ratio": c["actors"] / r["problems"] / lc, "baseline": "local process = 1x"})
            rows.append({"figure": f"driver CPU per problem ({w})", "config": r["mode"],
                         "value": c["driver"] / r["problems"] * 1e3, "unit": "CPU ms/problem",
                         "ratio": c["driver"] / r["problems"] / lc, "baseline": "vs local search CPU"})
            rows.append({"figure": f"Ray daemons CPU ({w})", "config": r["mode"],
                         "value": c["system"] / r["search_s"], "unit": "CPU s per s",
                         "ratio": None, "baseline": "GCS, raylet, idle workers; per second of search"})
        ray1 = runs[1]
        if w == "fake":
            per = 1.0 / ray1["rate"] - 1.0 / local["rate"]
            rows.append({"figure": "Ray path overhead per problem", "config": "1 actor vs 1 process, instant search",
                         "value": per * 1e3, "unit": "ms/problem", "ratio": ray1["rate"] / local["rate"],
                         "baseline": f"local {1e3 / local['rate']:.2f} ms/problem"})
        for r in runs[1:]:
            rows.append({"figure": f"actor start-up ({w})", "config": r["mode"], "value": r["startup_s"], "unit": "s",
                         "ratio": None, "baseline": f"local components {local['startup_s']:.1f} s"})
    rt = res["round_trip"]
    rows.append({"figure": "record round trip through an actor", "config": f"{rt['nodes']} nodes, "
                 f"{rt['json_bytes'] / 1e6:.2f} MB JSON", "value": rt["round_trip_s"] * 1e3, "unit": "ms",
                 "ratio": rt["round_trip_s"] / rt["empty_call_s"],
                 "baseline": f"empty call {rt['empty_call_s'] * 1e3:.2f} ms; pickle {rt['pickle_s'] * 1e3:.2f} ms"})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("figure", "config", "value", "unit", "ratio", "baseline / note")
    lines = [(r["figure"], r["config"], f"{r['value']:,.3g}" if r["value"] == r["value"] else "-", r["unit"],
              "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r["baseline"]) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))  # noqa: T201
    print("-+-".join("-" * w for w in widths))  # noqa: T201
    for line in lines:
        print(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)))  # noqa: T201


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=32, help="problems of the tiny workload (x20 for fake)")
    p.add_argument("--workloads", default="tiny,fake")
    p.add_argument("--json", default=None, help="also write the raw figures here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    res = run_all(a.problems, [w for w in a.workloads.split(",") if w])
    print_table(rows_for_report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


# ------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # standalone use without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    def test_distributed_throughput(benchmark, engine_report) -> None:  # type: ignore[no-untyped-def]
        from bench_engine import Row

        res = benchmark.pedantic(run_all, args=(16, ["tiny", "fake"]), rounds=1, iterations=1)
        for r in rows_for_report(res):
            engine_report.add(Row(r["figure"], r["config"], r["value"], r["unit"], r["baseline"], r["ratio"]))
            benchmark.extra_info[f"{r['figure']} {r['config']}"] = r["value"]
        assert all(run["problems"] > 0 for runs in res["workloads"].values() for run in runs)


if __name__ == "__main__":
    raise SystemExit(main())
