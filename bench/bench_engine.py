"""Benchmarks of the C++ forest engine (``rstar._core``), each against a baseline measured in
the same run.

Figures (see docs/engine.md for the recorded numbers):

* synthetic search, no model: simulations/s (1 simulation = select + expand + backup of one
  leaf, driven through the Python batch API, one call per batch over B trees) for
  B in {1, 64, 1024, 16384}, A in {4, 8, 16} children, 64 / 256 simulations per tree, one thread
  and all cores; the same workload on the pure-Python reference (baseline). Same seed, same
  rules: the runs must build the same trees, and each row says whether they did ("same trees",
  from a fingerprint of every root's and root child's statistics taken after the clock stops);
* cost per leaf through the Python boundary (select + expand + backup) at L leaves per call;
* bytes per node at 10^7 nodes (RSS delta / nodes, and ``memory_stats``);
* optionally mctx (``pip install .[bench]``) on the same synthetic workload.

Run standalone (prints the table)::

    python bench/bench_engine.py --quick     # < 2 minutes on 2 cores
    python bench/bench_engine.py             # every configuration

or through pytest-benchmark (``pytest bench/``), whose session ends with the same table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

try:  # pytest is optional for the standalone run
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

NODE_BUDGET = 20_000_000  # skip synthetic configs whose trees would need more nodes (RAM)
REFERENCE_BUDGET_S = 20.0  # skip reference runs estimated to take longer
SEED = 0
LAST_CPU_S = [0.0]  # process CPU seconds of the last synthetic_search (shared boxes: see notes)


@dataclass
class Row:
    """One line of the summary table."""

    figure: str
    config: str
    value: float | None
    unit: str
    baseline: str = ""
    ratio: float | None = None
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def table(self) -> str:
        head = ("figure", "config", "value", "unit", "ratio", "baseline / note")
        lines = []
        for r in self.rows:
            value = "-" if r.value is None else _fmt(r.value)
            ratio = "-" if r.ratio is None else f"{r.ratio:,.1f}x"
            lines.append((r.figure, r.config, value, r.unit, ratio, " ".join(x for x in (r.baseline, r.note) if x)))
        widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
        out = [" | ".join(str(h).ljust(w) for h, w in zip(head, widths))]
        out.append("-+-".join("-" * w for w in widths))
        out += [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
        return "\n".join(out)


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:,.2f}"
    return f"{v:.3g}"


# ---------------------------------------------------------------------------------------------
# workloads


def _core() -> Any:
    from rstar import _core

    return _core


def _reference_cls() -> Any:
    from rstar.engine.reference import ReferenceForest

    return ReferenceForest


class _Randoms:
    """Pre-drawn random priors and values (seeded), sliced per batch: the "model" costs nothing."""

    def __init__(self, rng: np.random.Generator, max_leaves: int, A: int) -> None:
        self.A = A
        self.priors = rng.random(4 * max_leaves * A, dtype=np.float64)
        self.values = rng.uniform(-1.0, 1.0, 4 * max_leaves)
        self.n_children = np.full(max_leaves, A, dtype=np.int64)
        self.turn = 0

    def batch(self, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self.turn % 4
        self.turn += 1
        return (
            self.n_children[:L],
            self.priors[k * L * self.A : (k + 1) * L * self.A],
            self.values[k * L : (k + 1) * L],
        )


def synthetic_search(make_forest: Callable[[int], Any], B: int, A: int, sims: int, seed: int = SEED,
                     trees_out: list[Any] | None = None, steady: bool = False) -> tuple[float, int]:
    """Runs `sims` rounds of select -> expand(A children) -> backup over B trees.

    Returns (seconds, simulations). Forest creation and add_trees are not timed. With
    `trees_out`, appends a fingerprint of the final trees (see `fingerprint`), taken after
    the clock stopped. `steady`: the steady state of a long search job, where a forest serves
    problem after problem: the same search first runs untimed on B other trees, which are
    then released, so the timed search reuses their memory (free lists) instead of growing
    the arenas into fresh pages."""
    forest = make_forest(B * (sims * A + 1) + 16)
    if steady:
        warm = forest.add_trees(np.zeros(B, dtype=np.uint64))
        _search_loop(forest, warm, _Randoms(np.random.default_rng(seed + 1), B, A), sims)
        forest.release_trees(warm.astype(np.int64))
    trees = forest.add_trees(np.zeros(B, dtype=np.uint64))
    rnd = _Randoms(np.random.default_rng(seed), B, A)
    gc.collect()
    c0 = time.process_time()
    t0 = time.perf_counter()
    done = _search_loop(forest, trees, rnd, sims)
    LAST_CPU_S[0] = time.process_time() - c0
    secs = time.perf_counter() - t0
    if trees_out is not None:
        trees_out.append(fingerprint(forest, trees))
    return secs, done


def _search_loop(forest: Any, trees: Any, rnd: _Randoms, sims: int) -> int:
    done = 0
    for _ in range(sims):
        sel = forest.select(trees)
        L = len(sel)
        n_children, priors, values = rnd.batch(L)
        forest.expand(sel.tickets, n_children, priors=priors)
        forest.backup(sel.tickets, values)
        done += L
    return done


def fingerprint(forest: Any, trees: Any) -> tuple[Any, ...]:
    """What the search built, for checking that two implementations ran the same workload to
    the same result: visits, Q and pending counts of every root and root child, node counts,
    and the engine's counters. Same seed, same rules: equal bit for bit."""
    ts, rc = forest.tree_stats(trees), forest.root_child_stats(trees)
    return tuple(a.tobytes() for a in (ts["visits"], ts["q"], ts["pending"], ts["n_nodes"], rc["offsets"],
                                        rc["visits"], rc["q"], rc["prior"])) + (forest.stats(),)


def same_trees(a: list[Any]) -> str:
    """"same trees" when every fingerprint in `a` is equal, else a loud note."""
    return "same trees" if all(x == a[0] for x in a) else "TREES DIFFER"


# The synthetic workload has random priors, which only PUCT uses (as mctx's muzero_policy).
# Under "rstar" a visited child always outscores an unvisited one (score exactly 0), so trees
# grow into chains (mean depth ~27 at 64 sims) and a descent costs O(depth * A): reported as a
# separate row.
RULE = "puct"


def core_forest(threads: int, rule: str = RULE) -> Callable[[int], Any]:
    return lambda max_nodes: _core().Forest(max_nodes, rule=rule, num_threads=threads, max_children=64)


def reference_forest(rule: str = RULE) -> Callable[[int], Any]:
    return lambda max_nodes: _reference_cls()(max_nodes, rule=rule, num_threads=1, max_children=64)


def boundary_cost(make_forest: Callable[[int], Any], L: int, min_leaves: int = 200_000, A: int = 4) -> float:
    """Seconds per leaf for select + expand + backup calls of L leaves each (L trees, K = 1)."""
    rounds = max(3, min_leaves // L)
    forest = make_forest(L * (rounds * A + 1) + 16)
    trees = forest.add_trees(np.zeros(L, dtype=np.uint64))
    rnd = _Randoms(np.random.default_rng(SEED), L, A)
    leaves = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        sel = forest.select(trees)
        n_children, priors, values = rnd.batch(len(sel))
        forest.expand(sel.tickets, n_children, priors=priors)
        forest.backup(sel.tickets, values)
        leaves += len(sel)
    return (time.perf_counter() - t0) / leaves


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bytes_per_node(n_nodes: int = 10_000_000, A: int = 16) -> tuple[float, dict[str, int]]:
    """RSS growth per node while building `n_nodes` nodes (B = 4096 trees, A children)."""
    core = _core()
    B = 4096
    forest = core.Forest(n_nodes + B * A + B, num_threads=1, max_children=A)
    gc.collect()
    rss0 = _rss_bytes()
    trees = forest.add_trees(np.zeros(B, dtype=np.uint64))
    n_children = np.full(B, A, dtype=np.int64)
    values = np.zeros(B)
    while forest.memory_stats()["high_water"] + B * A <= n_nodes:
        sel = forest.select(trees)
        forest.expand(sel.tickets, n_children[: len(sel)])
        forest.backup(sel.tickets, values[: len(sel)])
    del sel
    gc.collect()
    ms = forest.memory_stats()
    return (_rss_bytes() - rss0) / ms["high_water"], ms


def mctx_synthetic(B: int, A: int, sims: int) -> tuple[float, float] | None:
    """mctx muzero_policy on the same shape (random priors/values, no network): returns
    (seconds per call after compilation, compile seconds), or None when jax/mctx are missing."""
    try:
        import jax
        import jax.numpy as jnp
        import mctx
    except ImportError:
        return None

    def recurrent_fn(params: Any, rng_key: Any, action: Any, embedding: Any) -> Any:
        k1, k2 = jax.random.split(rng_key)
        n = action.shape[0]
        out = mctx.RecurrentFnOutput(
            reward=jnp.zeros((n,)),
            discount=jnp.ones((n,)),
            prior_logits=jax.random.normal(k1, (n, A)),
            value=jax.random.uniform(k2, (n,), minval=-1.0, maxval=1.0),
        )
        return out, embedding + 1

    def run(key: Any, logits: Any, value: Any) -> Any:
        root = mctx.RootFnOutput(prior_logits=logits, value=value, embedding=jnp.zeros(value.shape, jnp.int32))
        out = mctx.muzero_policy(params=(), rng_key=key, root=root, recurrent_fn=recurrent_fn, num_simulations=sims)
        return out.search_tree.node_visits

    key = jax.random.PRNGKey(SEED)
    logits = jax.random.normal(key, (B, A))
    value = jnp.zeros((B,))
    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(key, logits, value).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(key, logits, value))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(key, logits, value))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), compile_s


# ---------------------------------------------------------------------------------------------
# the table


def synthetic_configs(quick: bool) -> list[tuple[int, int, int]]:
    if quick:
        return [(B, 8, 64) for B in (1, 64, 1024, 16384)]
    return [(B, A, s) for s in (64, 256) for A in (4, 8, 16) for B in (1, 64, 1024, 16384)]


def best_of(repeat: int, make_forest: Callable[[int], Any], B: int, A: int, sims: int,
            trees_out: list[Any], steady: bool = False) -> tuple[float, float]:
    """The best of `repeat` runs of `synthetic_search`: (simulations/s, simulations per CPU-s
    of that run). Every run's fingerprint goes to `trees_out`."""
    best = (0.0, 0.0)
    for _ in range(repeat):
        secs, done = synthetic_search(make_forest, B, A, sims, trees_out=trees_out, steady=steady)
        if done / secs > best[0]:
            best = (done / secs, done / LAST_CPU_S[0])
    return best


def collect(quick: bool = False, log: Callable[[str], None] = lambda s: None, repeat: int = 1) -> Report:
    """The table. `repeat` > 1 runs each synthetic configuration (C++ and reference alike) that
    many times and keeps the best run: on a shared machine a single run can lose much of its
    time to other jobs."""
    rep = Report()
    best_note = f", best of {repeat}" if repeat > 1 else ""
    cores = os.cpu_count() or 1
    ref_rate: float | None = None  # reference simulations/s, calibrated once
    try:
        _reference_cls()
        have_ref = True
    except ImportError:
        have_ref = False
    if have_ref:
        secs, done = synthetic_search(reference_forest(), 64, 8, 16)
        ref_rate = done / secs
    for B, A, sims in synthetic_configs(quick):
        cfg = f"B={B} A={A} sims={sims}"
        if B * (sims * A + 1) > NODE_BUDGET:
            rep.add(Row("synthetic sims/s", cfg, None, "sims/s", note=f"skipped: > {NODE_BUDGET:,} nodes"))
            continue
        ref = None
        prints: list[Any] = []  # fingerprints of the final trees: every implementation must agree
        if ref_rate is not None:
            est = B * sims / ref_rate
            if est <= REFERENCE_BUDGET_S:
                ref, ref_cpu = best_of(repeat, reference_forest(), B, A, sims, prints)
                rep.add(Row("synthetic sims/s", cfg + " reference", ref, "sims/s", "pure Python",
                            note=f"[{ref_cpu:,.0f} per CPU-s{best_note}]"))
            else:
                rep.add(Row("synthetic sims/s", cfg + " reference", None, "sims/s", note=f"skipped: est. {est:.0f} s"))
        one = None
        for threads in (1, 0) if cores > 1 else (1,):
            rate, cpu_rate = best_of(repeat, core_forest(threads), B, A, sims, prints)
            label = "1 thread" if threads == 1 else f"{cores} threads"
            check = same_trees(prints) + (" as reference" if ref else " as 1 thread" if threads != 1 else "")
            if threads == 1:
                one = rate
                row = Row("synthetic sims/s", f"{cfg} C++ {label}", rate, "sims/s",
                          note=f"[{cpu_rate:,.0f} per CPU-s{best_note}] {check if ref else ''}".rstrip())
                if ref:
                    row.baseline, row.ratio = "vs reference", rate / ref
            else:
                row = Row("synthetic sims/s", f"{cfg} C++ {label}", rate, "sims/s", "vs 1 thread", rate / one if one else None,
                          note=check)
            rep.add(row)
            log(f"{row.config}: {rate:,.0f} sims/s ({check})")
    # Steady state: a forest that has served (and released) a search before, as in a long
    # data-generation job; the timed search reuses freed memory instead of fresh pages.
    for B in (64, 1024):
        cfg = f"B={B} A=8 sims=64 steady"
        prints = []
        ref = None
        if ref_rate is not None:
            ref, ref_cpu = best_of(repeat, reference_forest(), B, 8, 64, prints, steady=True)
            rep.add(Row("synthetic sims/s", cfg + " reference", ref, "sims/s", "pure Python",
                        note=f"[{ref_cpu:,.0f} per CPU-s{best_note}]"))
        rate, cpu_rate = best_of(repeat, core_forest(1), B, 8, 64, prints, steady=True)
        row = rep.add(Row("synthetic sims/s", cfg + " C++ 1 thread", rate, "sims/s",
                          note=f"[{cpu_rate:,.0f} per CPU-s{best_note}] {same_trees(prints) + ' as reference' if ref else ''}".rstrip()))
        if ref:
            row.baseline, row.ratio = "vs reference", rate / ref
        log(f"{row.config}: {rate:,.0f} sims/s")
    # The official rule on the same workload (deep chains: see RULE above). The reference is
    # slow on deep chains, so the comparison runs at B=256; B=1024 is the C++ alone.
    prints = []
    if ref_rate is not None:
        secs_r, done_r = synthetic_search(reference_forest("rstar"), 256, 8, 64, trees_out=prints)
        rep.add(Row("synthetic sims/s", "B=256 A=8 sims=64 rule=rstar reference", done_r / secs_r, "sims/s", "pure Python"))
    secs, done = synthetic_search(core_forest(1, "rstar"), 256, 8, 64, trees_out=prints)
    row = rep.add(Row("synthetic sims/s", "B=256 A=8 sims=64 rule=rstar C++ 1 thread", done / secs, "sims/s"))
    if prints[:-1]:
        row.baseline, row.ratio, row.note = "vs reference", (done / secs) / (done_r / secs_r), same_trees(prints) + " as reference"
    log(f"{row.config}: {row.value:,.0f} sims/s")
    secs, done = synthetic_search(core_forest(1, "rstar"), 1024, 8, 64)
    row = rep.add(Row("synthetic sims/s", "B=1024 A=8 sims=64 rule=rstar C++ 1 thread", done / secs, "sims/s",
                      note=f"[{done / LAST_CPU_S[0]:,.0f} per CPU-s]"))
    log(f"{row.config}: {row.value:,.0f} sims/s")
    for L in (1, 64, 1024, 16384):
        per_leaf = boundary_cost(core_forest(1), L, min_leaves=50_000 if quick else 200_000)
        row = Row("boundary cost per leaf", f"L={L} C++", per_leaf * 1e6, "us/leaf")
        if have_ref:
            ref_leaf = boundary_cost(reference_forest(), L, min_leaves=2_000 if quick else 10_000)
            row.baseline, row.ratio = f"vs reference {ref_leaf * 1e6:,.1f} us/leaf", ref_leaf / per_leaf
        rep.add(row)
        log(f"{row.config}: {per_leaf * 1e6:.3f} us/leaf")
    bpn, ms = bytes_per_node()
    rep.add(Row("bytes per node", f"{ms['high_water']:,} nodes, RSS delta", bpn, "B/node", "vs 48 B target", bpn / 48.0))
    rep.add(Row("bytes per node", "hot record (memory_stats node_bytes = hot + cold)", 32.0, "B/node",
                "vs 48 B target", 32.0 / 48.0, f"hot 32 + cold 24 = {ms['node_bytes']}"))
    log(f"bytes per node: {bpn:.1f}")
    for B in (1, 64) if quick else (1, 64, 1024):
        got = mctx_synthetic(B, 8, 64)
        if got is None:
            rep.add(Row("mctx muzero_policy sims/s", f"B={B} A=8 sims=64", None, "sims/s", note="skipped: jax/mctx not installed"))
            break
        secs, compile_s = got
        secs_c, done = synthetic_search(core_forest(1), B, 8, 64)
        rate = B * 64 / secs
        rep.add(Row("mctx muzero_policy sims/s", f"B={B} A=8 sims=64", rate, "sims/s", f"C++ is {done / secs_c / rate:,.1f}x",
                    note=f"compile {compile_s:.1f} s"))
    return rep


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entry points (``pytest bench/``); conftest.py prints the table at the end

if pytest is not None:

    @pytest.fixture(scope="module")
    def core() -> Any:
        return pytest.importorskip("rstar._core", reason="rstar._core is not built")

    @pytest.mark.parametrize("threads", [1, 0], ids=["1thread", "allcores"])
    @pytest.mark.parametrize("B,A,sims", synthetic_configs(quick=False), ids=lambda v: str(v))
    def test_synthetic(benchmark: Any, core: Any, engine_report: Report, B: int, A: int, sims: int, threads: int) -> None:
        if B * (sims * A + 1) > NODE_BUDGET:
            pytest.skip(f"needs more than {NODE_BUDGET:,} nodes")
        result: dict[str, float] = {}
        prints: list[Any] = []

        def run() -> None:
            prints.clear()
            secs, done = synthetic_search(core_forest(threads), B, A, sims, trees_out=prints)
            result["rate"] = done / secs

        benchmark.pedantic(run, rounds=1, iterations=1)
        row = engine_report.add(Row("synthetic sims/s", f"B={B} A={A} sims={sims} C++ {'1 thread' if threads == 1 else 'all cores'}",
                                    result["rate"], "sims/s"))
        ref_key = ("ref", B, A, sims)
        if ref_key not in engine_report.cache:
            est = B * sims / engine_report.reference_rate()
            engine_report.cache[ref_key] = None
            if est <= REFERENCE_BUDGET_S:
                ref_prints: list[Any] = []
                secs, done = synthetic_search(reference_forest(), B, A, sims, trees_out=ref_prints)
                engine_report.cache[ref_key] = (done / secs, ref_prints[0])
        ref = engine_report.cache[ref_key]
        if ref:
            row.baseline, row.ratio = "vs reference (same run)", result["rate"] / ref[0]
            row.note = same_trees([ref[1], *prints]) + " as reference"

    @pytest.mark.parametrize("L", [1, 64, 1024, 16384])
    def test_boundary_cost(benchmark: Any, core: Any, engine_report: Report, L: int) -> None:
        result: dict[str, float] = {}

        def run() -> None:
            result["per_leaf"] = boundary_cost(core_forest(1), L)

        benchmark.pedantic(run, rounds=1, iterations=1)
        ref_leaf = boundary_cost(reference_forest(), L, min_leaves=10_000)
        engine_report.add(Row("boundary cost per leaf", f"L={L}", result["per_leaf"] * 1e6, "us/leaf",
                              f"vs reference {ref_leaf * 1e6:,.1f} us/leaf", ref_leaf / result["per_leaf"]))

    def test_bytes_per_node(benchmark: Any, core: Any, engine_report: Report) -> None:
        result: dict[str, Any] = {}

        def run() -> None:
            result["bpn"], result["ms"] = bytes_per_node()

        benchmark.pedantic(run, rounds=1, iterations=1)
        engine_report.add(Row("bytes per node", f"{result['ms']['high_water']:,} nodes, RSS delta", result["bpn"], "B/node",
                              "vs 48 B target", result["bpn"] / 48.0))

    def test_mctx(benchmark: Any, engine_report: Report) -> None:
        pytest.importorskip("jax")
        pytest.importorskip("mctx")
        result: dict[str, Any] = {}

        def run() -> None:
            result["got"] = mctx_synthetic(64, 8, 64)

        benchmark.pedantic(run, rounds=1, iterations=1)
        secs, compile_s = result["got"]
        secs_c, done = synthetic_search(core_forest(1), 64, 8, 64)
        rate = 64 * 64 / secs
        engine_report.add(Row("mctx muzero_policy sims/s", "B=64 A=8 sims=64", rate, "sims/s",
                              f"C++ is {done / secs_c / rate:,.1f}x", note=f"compile {compile_s:.1f} s"))


def _load() -> str:
    with open("/proc/loadavg") as fh:
        return fh.read().split()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="B in {1, 64, 1024, 16384}, A = 8, 64 sims (< 2 min)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run each synthetic configuration N times (C++ and reference alike) and keep the best")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    load0 = _load()
    rep = collect(quick=args.quick, log=lambda s: print(s, file=sys.stderr, flush=True), repeat=max(1, args.repeat))
    print(rep.table())
    print(f"\n({time.perf_counter() - t0:.0f} s on {os.cpu_count()} cores, load average {load0} at the start, "
          f"{_load()} at the end; rule={RULE} unless noted; ratios measured in this run)")
    return 0


if __name__ == "__main__":
    # Run from a checkout without `pip install -e .`: fall back to the source tree.
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
