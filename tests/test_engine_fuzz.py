"""Fuzz test: >= 10^5 random API calls, many of them invalid, against the C++ forest.

Every call must either succeed or raise one of the documented exceptions (ValueError,
UnknownIdError, ForestStateError, CapacityError; TypeError only for arguments of the wrong
Python type), and the process must never crash. A simple independent model of what the
calls should have done (which tickets are open and through which nodes, which values ended
where) is kept from the successful calls; every few thousand calls the forest is checked
against it: pending counts per node, N and W per node (no lost and no partial update), open
tickets, node accounting. The seed is fixed, so a failure reproduces.

The reference implementation runs the same fuzz with fewer calls (its robustness matters:
it is what the differential tests trust)."""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from rstar.engine.reference import ReferenceForest

logger = logging.getLogger(__name__)

SCALE = 4294967296.0
DOCUMENTED = ("ValueError", "UnknownIdError", "ForestStateError", "CapacityError")


def fx(v: float) -> int:
    return int(math.floor(v * 4294967296.0 + 0.5))


def _core_cls() -> type:
    from rstar import _core  # the extension is part of the package: a missing build fails
    return _core.Forest


@dataclass
class _Open:
    tree: int
    path: list[int]  # pending visits sit on path[start_index:]
    start_index: int
    leaf: int
    expanded: bool = False


@dataclass
class Model:
    """What the successful calls should have done, kept independently of the engine."""

    live: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)  # ids ever seen (some stale after release)
    node_tree: dict[int, int] = field(default_factory=dict)
    open: dict[int, _Open] = field(default_factory=dict)
    resolved: list[int] = field(default_factory=list)
    end_n: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    end_w: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    own_n: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    own_w: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))

    def forget_tree_nodes(self, nodes: list[int]) -> None:
        for i in nodes:
            for d in (self.end_n, self.end_w, self.own_n, self.own_w):
                d.pop(i, None)


# add, select, select_from, expand x2, set_values, backup, cancel, backup_nodes, mark_invalid,
# release (rarer, so that trees grow), read, malformed
_OP_WEIGHTS = [1, 1.2, 1, 1, 1, 1, 1, 1, 1, 1, 0.35, 1, 0.8]


class Fuzzer:
    """Draws random calls (valid and invalid), runs them, updates the model on success."""

    def __init__(self, forest: Any, seed: int) -> None:
        self.f = forest
        self.rng = np.random.default_rng(seed)  # arrays
        self.r = random.Random(seed)  # scalars (much cheaper per draw)
        self.m = Model()
        self.ok: defaultdict[str, int] = defaultdict(int)
        self.err: defaultdict[str, int] = defaultdict(int)
        self.calls = 0

    # -- random pieces --------------------------------------------------------------------
    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def some(self, pool: list[int], k: int) -> list[int]:
        if not pool:
            return []
        return self.r.choices(pool, k=self.r.randint(1, k))

    def corrupt_ids(self, ids: list[int], stale: list[int], unknown: int) -> list[int]:
        r = self.r.random()
        if r < 0.06 and stale:
            return ids + [self.r.choice(stale)]
        if r < 0.10:
            return ids + [unknown]
        if r < 0.13 and ids:
            return ids + [ids[0]]
        return ids

    def values(self, n: int) -> list[float]:
        vals = [round(self.r.uniform(-1, 1), 4) for _ in range(n)]
        r = self.r.random()
        if r < 0.04 and n:
            vals[self.r.randrange(n)] = self.r.choice([math.nan, math.inf, -math.inf, 1e30])
        elif r < 0.07:
            vals.append(0.5)
        return vals

    # -- one call ---------------------------------------------------------------------------
    def run(self, name: str, fn: Any, *, mistyped: bool = False,
            must_fail: bool = False) -> tuple[bool, Any]:
        self.calls += 1
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - the point is to classify every exception
            cls = type(exc).__name__
            if cls not in DOCUMENTED and not (mistyped and isinstance(exc, TypeError)):
                raise AssertionError(f"{name} raised an undocumented {cls}: {exc}") from exc
            self.err[name] += 1
            return False, None
        assert not must_fail, f"{name}: a malformed call was accepted"
        self.ok[name] += 1
        return True, out

    def step(self) -> None:
        op = self.r.choices(range(13), weights=_OP_WEIGHTS)[0]
        f, m, rng = self.f, self.m, self.rng
        if op == 0 or not m.live:
            payloads = rng.integers(0, 2**63, self.r.randint(0, 3), dtype=np.uint64)
            ok, out = self.run("add_trees", lambda: f.add_trees(payloads))
            if ok:
                m.live.extend(out.tolist())
                roots = f.roots(out).tolist()
                m.nodes.extend(roots)
                m.node_tree.update(zip(roots, out.tolist()))
        elif op in (1, 2):
            trees = self.corrupt_ids(self.some(m.live, 4), m.released, 10**8)
            k = self.r.choice([0, 1, 1, 2, 4, -2])
            kw: dict[str, Any] = {}
            if self.chance(0.2):
                kw["rule"] = self.r.choice(["rstar", "puct", "nope"])
            if self.chance(0.1):
                kw["c"] = self.r.choice([0.0, 1.0, -1.0, math.nan])
            if op == 1:
                ok, sel = self.run("select", lambda: f.select(np.array(trees, dtype=np.int64), k, **kw))
            else:
                # at most one start node per tree, so that each ticket's start is known
                by_tree = {m.node_tree[i]: i for i in self.some(m.nodes, 3)}
                nodes = self.corrupt_ids(list(by_tree.values()), [], 2**31)
                ok, sel = self.run("select_from", lambda: f.select_from(nodes, k, **kw))
            if ok:
                for j in range(len(sel)):
                    a, b = int(sel.path_offsets[j]), int(sel.path_offsets[j + 1])
                    path = sel.path_nodes[a:b].tolist()
                    tree = int(sel.trees[j])
                    si = 0 if op == 1 else path.index(by_tree[tree])
                    m.open[int(sel.tickets[j])] = _Open(tree, path, si, path[-1])
        elif op in (3, 4):
            tks = self.corrupt_ids(self.some(list(m.open), 3), m.resolved, (9 << 32) | 3)
            ns = [self.r.randint(0, 5) for _ in tks]
            if self.chance(0.03):
                ns.append(1)
            if self.chance(0.02) and ns:
                ns[0] = 5000  # above max_children
            tot = max(sum(ns), 0)
            kw = {}
            if self.chance(0.5):
                pri = rng.random(tot)
                if self.chance(0.05) and tot:
                    pri[0] = math.nan
                kw["priors"] = pri
            if self.chance(0.5):
                kw["terminal"] = rng.random(tot + int(self.chance(0.03))) < 0.25
            if self.chance(0.3):
                kw["payloads"] = rng.integers(0, 2**40, tot, dtype=np.uint64)
            if self.chance(0.3):
                kw["rewards"] = rng.uniform(-1, 1, tot)
            ok, firsts = self.run("expand", lambda: f.expand(np.array(tks, dtype=np.uint64), ns, **kw))
            if ok:
                for tk, f0, n in zip(tks, firsts.tolist(), ns):
                    m.open[tk].expanded = True
                    kids = list(range(f0, f0 + n)) if n else []
                    m.nodes.extend(kids)
                    m.node_tree.update((i, m.open[tk].tree) for i in kids)
        elif op == 5:
            nodes = self.corrupt_ids(list(dict.fromkeys(self.some(m.nodes, 4))), [], 2**31)
            vals = self.values(len(nodes))
            ok, _ = self.run("set_values", lambda: f.set_values(np.array(nodes, dtype=np.int64), vals))
            if ok:
                for i, v in zip(nodes, vals):
                    m.own_n[i] += 1
                    m.own_w[i] += fx(v)
        elif op in (6, 7):
            tks = self.corrupt_ids(list(dict.fromkeys(self.some(list(m.open), 3))), m.resolved, 77)
            if op == 6:
                vals = self.values(len(tks))
                ok, _ = self.run("backup", lambda: f.backup(np.array(tks, dtype=np.uint64), vals))
            else:
                vals = None
                ok, _ = self.run("cancel", lambda: f.cancel(np.array(tks, dtype=np.uint64)))
            if ok:
                for j, tk in enumerate(tks):
                    t = m.open.pop(tk)
                    m.resolved.append(tk)
                    if vals is not None:
                        m.end_n[t.leaf] += 1
                        m.end_w[t.leaf] += fx(vals[j])
        elif op == 8:
            nodes = self.corrupt_ids(self.some(m.nodes, 4), [], 2**31)
            vals = self.values(len(nodes))
            ok, _ = self.run("backup_nodes", lambda: f.backup_nodes(nodes, vals))
            if ok:
                for i, v in zip(nodes, vals):
                    m.end_n[i] += 1
                    m.end_w[i] += fx(v)
        elif op == 9:
            nodes = self.corrupt_ids(list(dict.fromkeys(self.some(m.nodes, 3))), [], 2**31)
            v = -1.0 if self.chance(0.7) else self.values(1)[0]
            ok, _ = self.run("mark_invalid", lambda: f.mark_invalid(nodes, v))
            if ok:
                for i in nodes:
                    m.own_n[i] += 1
                    m.own_w[i] += fx(v)
        elif op == 10:
            trees = self.corrupt_ids(list(dict.fromkeys(self.some(m.live, 2))), m.released, 10**8)
            if self.chance(0.7):  # usually resolve their tickets first
                mine = [tk for tk, t in m.open.items() if t.tree in trees]
                if mine:
                    ok, _ = self.run("cancel", lambda: f.cancel(mine))
                    if ok:
                        for tk in mine:
                            m.open.pop(tk)
                            m.resolved.append(tk)
            exports = {t: f.export_tree(t)["node"].tolist() for t in trees if t in m.live}
            ok, _ = self.run("release_trees", lambda: f.release_trees(trees))
            if ok:
                for t in trees:
                    m.live.remove(t)
                    m.released.append(t)
                    m.forget_tree_nodes(exports[t])
                    gone = set(exports[t])
                    m.nodes = [i for i in m.nodes if i not in gone]
        elif op == 11:
            nodes = self.corrupt_ids(self.some(m.nodes, 3), [], 2**31)
            which = self.r.randrange(6)
            trees = self.corrupt_ids(self.some(m.live, 3), m.released, 10**8)
            calls = [
                ("node_stats", lambda: f.node_stats(nodes)),
                ("children", lambda: f.children(nodes[0] if nodes else 2**31)),
                ("tree_stats", lambda: f.tree_stats(trees)),
                ("root_child_stats", lambda: f.root_child_stats(self.some(m.live, 3))),
                ("export_tree", lambda: f.export_tree(self.some(m.live, 1)[0] if m.live else 10**8)),
                ("export_tree_dict", lambda: f.export_tree_dict(
                    self.some(m.live + m.released, 1)[0] if m.live else 10**8)),
            ]
            self.run(*calls[which])
        else:  # deliberately malformed arguments
            bad = [
                ("select", lambda: f.select(np.zeros((2, 2), dtype=np.int64))),
                ("select", lambda: f.select(["a", "b"])),
                ("backup", lambda: f.backup(None, [1.0])),
                ("set_values", lambda: f.set_values([[0, 1]], [0.0, 1.0])),
                ("expand", lambda: f.expand([1], "three")),
                ("mark_invalid", lambda: f.mark_invalid([0], "x")),
                ("select", lambda: f.select(m.live[:1], k=70_000)),  # k above 65536
                ("release_trees", lambda: f.release_trees([-1])),
            ]
            name, fn = self.r.choice(bad)
            self.run(name, fn, mistyped=True, must_fail=True)

    # -- invariants ---------------------------------------------------------------------------
    def check(self) -> None:
        f, m = self.f, self.m
        mem = f.memory_stats()
        assert mem["tickets_open"] == len(m.open)
        assert mem["trees_live"] == len(m.live)
        assert sorted(f.live_trees().tolist()) == sorted(m.live)
        assert mem["nodes_in_use"] + mem["nodes_free"] == mem["high_water"] <= mem["max_nodes"]
        pending: defaultdict[int, int] = defaultdict(int)
        open_per_tree: defaultdict[int, int] = defaultdict(int)
        for t in m.open.values():
            open_per_tree[t.tree] += 1
            for i in t.path[t.start_index:]:
                pending[i] += 1
        total = 0
        if m.live:
            ts = f.tree_stats(m.live)
            assert ts["open_tickets"].tolist() == [open_per_tree[t] for t in m.live]
            total = int(ts["n_nodes"].sum())
        assert total == mem["nodes_in_use"]
        for t in m.live:
            exp = f.export_tree(t)
            ids = exp["node"].tolist()
            pi = exp["parent_index"].tolist()
            n = [m.own_n.get(i, 0) for i in ids]
            w = [m.own_w.get(i, 0) for i in ids]
            sub_n = [m.end_n.get(i, 0) for i in ids]
            sub_w = [m.end_w.get(i, 0) for i in ids]
            for j in range(len(ids) - 1, 0, -1):  # children come after parents
                sub_n[pi[j]] += sub_n[j]
                sub_w[pi[j]] += sub_w[j]
            exp_n = [a + b for a, b in zip(n, sub_n)]
            exp_w = [float(a + b) / SCALE for a, b in zip(w, sub_w)]
            assert exp["visits"].tolist() == exp_n, f"tree {t}: visits"
            assert exp["value_sum"].tolist() == exp_w, f"tree {t}: value sums"
            assert exp["pending"].tolist() == [pending.get(i, 0) for i in ids], f"tree {t}: pending"
            v = exp["visits"]
            assert np.array_equal(exp["q"][v > 0], exp["value_sum"][v > 0] / v[v > 0])
            states = exp["state"]
            for tk, o in m.open.items():
                if o.tree == t and not o.expanded:
                    assert states[ids.index(o.leaf)] == 1, f"ticket {tk}: leaf not EXPANDING"


def fuzz(forest: Any, n_calls: int, seed: int) -> Fuzzer:
    z = Fuzzer(forest, seed)
    while z.calls < n_calls:
        z.step()
        if z.calls % 2500 < 1:
            z.check()
    z.check()
    # drain: everything resolves and releases cleanly
    if z.m.open:
        forest.cancel(list(z.m.open))
    if z.m.live:
        forest.release_trees(z.m.live)
    mem = forest.memory_stats()
    assert mem["nodes_in_use"] == 0 and mem["tickets_open"] == 0 and mem["trees_live"] == 0
    logger.info("fuzz: %d calls; ok %s; errors %s", z.calls, dict(z.ok), dict(z.err))
    # the calls must be meaningful: every kind of call succeeded and failed many times
    for name in ("add_trees", "select", "select_from", "expand", "set_values", "backup",
                 "cancel", "backup_nodes", "mark_invalid", "release_trees"):
        assert z.ok[name] >= n_calls // 2000, (name, dict(z.ok))
    for name in ("select", "expand", "set_values", "backup", "cancel", "mark_invalid",
                 "release_trees"):
        assert z.err[name] >= n_calls // 5000, (name, dict(z.err))
    return z


@pytest.mark.parametrize("rule", ["rstar", "puct"])
def test_fuzz_cpp(rule: str) -> None:
    cls = _core_cls()
    f = cls(30000, rule=rule, max_children=8, virtual_loss=0.25 if rule == "puct" else 0.0,
            num_threads=1, seed=1)
    fuzz(f, 45_000, seed=11 if rule == "rstar" else 12)


def test_fuzz_cpp_small_arena_many_threads() -> None:
    """A tiny arena (capacity errors all the time) and the internal pool enabled."""
    cls = _core_cls()
    fuzz(cls(400, max_children=8, num_threads=2), 12_000, seed=13)


def test_fuzz_reference() -> None:
    fuzz(ReferenceForest(30000, max_children=8), 8_000, seed=14)
