"""Differential tests: the C++ engine against the pure-Python reference.

Hypothesis draws random operation sequences (add trees, select / select_from with various k
and both rules, expand with random shapes and terminal flags, set_values, backup,
backup_nodes, mark_invalid, cancel, release), including invalid calls (stale tickets,
unknown ids, NaN, wrong lengths, duplicates, capacity), and applies each operation to both
implementations. Every result must be identical (arrays with their dtypes, selections, node
and ticket ids, counters) and so must every error (by class name); the whole observable state
(exports of every live tree, tree and root-child statistics, memory and counter statistics)
is compared every few operations and at the end.

The C++ forest runs with ``num_threads=1``. The default run takes well under 40 s; the
``slow``-marked variant runs many more and longer sequences."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rstar.engine.reference import ReferenceForest

logger = logging.getLogger(__name__)

core = pytest.importorskip("rstar._core", reason="rstar._core is not built yet")

# Values that stress the fixed-point rounding (halves of 2**-32, thirds, tiny magnitudes).
SPECIAL_VALUES = [0.0, 1.0, -1.0, 0.5, -0.5, 1.0 / 3.0, -1.0 / 3.0, 0.1, 2.0**-33, -(2.0**-33),
                  3 * 2.0**-33, -(3 * 2.0**-33), 0.7, 2.0**20]
VALUES = st.one_of(st.floats(-1.0, 1.0, allow_nan=False, width=64), st.sampled_from(SPECIAL_VALUES))
BAD_VALUES = st.sampled_from([math.nan, math.inf, -math.inf, 2.0**21])


def _canon(x: Any) -> Any:
    """A comparable form of a result: arrays keep their dtype, NaN equals NaN."""
    if isinstance(x, np.ndarray):
        vals = ["nan" if isinstance(v, float) and math.isnan(v) else v for v in x.tolist()]
        return ("ndarray", str(x.dtype), x.shape, vals)
    if isinstance(x, dict):
        return {k: _canon(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canon(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if hasattr(x, "tickets") and hasattr(x, "path_offsets"):  # a Selection
        return {
            a: _canon(getattr(x, a))
            for a in ("tickets", "trees", "nodes", "depths", "path_offsets", "path_nodes",
                      "path_payloads", "collisions", "dead_ends")
        } | {"len": len(x)}
    if isinstance(x, (bool, np.bool_)):
        return ("bool", bool(x))
    if isinstance(x, (int, np.integer)):
        return int(x)
    return x


@dataclass
class Pair:
    """The two forests, driven in lock step, plus what the test knows about their ids."""

    ref: Any
    cpp: Any
    log: list[str] = field(default_factory=list)
    open_tickets: list[int] = field(default_factory=list)
    resolved_tickets: list[int] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)  # every node id ever seen (some stale)
    live: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    ticket_tree: dict[int, int] = field(default_factory=dict)
    calls: int = 0
    errors: int = 0
    last_ok: bool = True

    def call(self, name: str, *args: Any, **kw: Any) -> Any:
        """Run one method on both; results or error class names must agree."""
        self.calls += 1
        self.log.append(f"{name}{_short(args)}{_short(kw) if kw else ''}")
        out = []
        for f in (self.ref, self.cpp):
            try:
                out.append(("ok", getattr(f, name)(*args, **kw)))
            except (ValueError, KeyError, RuntimeError, MemoryError, TypeError) as exc:
                out.append(("err", type(exc).__name__, str(exc)))
        (kr, *r), (kc, *c) = out
        assert kr == kc, f"{name}: reference {out[0]!r} vs C++ {out[1]!r}\n" + self.trace()
        self.last_ok = kr == "ok"
        if kr == "err":
            self.errors += 1
            assert r[0] == c[0], f"{name}: reference raised {r} but C++ raised {c}\n" + self.trace()
            return None
        assert _canon(r[0]) == _canon(c[0]), (
            f"{name}: results differ\nreference {r[0]!r}\nC++       {c[0]!r}\n" + self.trace()
        )
        return r[0]

    def trace(self) -> str:
        return "operations so far:\n  " + "\n  ".join(self.log[-40:])

    def compare_state(self) -> None:
        """Everything observable must be identical."""
        for name in ("live_trees", "stats"):
            self.call(name)
        mr, mc = self.ref.memory_stats(), self.cpp.memory_stats()
        for k in ("max_nodes", "nodes_in_use", "nodes_free", "high_water", "trees_live",
                  "trees_created", "tickets_open"):
            assert mr[k] == mc[k], f"memory_stats[{k}]: {mr[k]} vs {mc[k]}\n" + self.trace()
        live = self.ref.live_trees().tolist()
        if live:
            self.call("tree_stats", live)
            self.call("root_child_stats", live)
        for t in live:
            exp = self.call("export_tree", t)
            self.call("node_stats", exp["node"])
        if live:
            d = self.call("export_tree_dict", live[-1])
            json.dumps(d, allow_nan=False)

    # -- bookkeeping after successful calls ----------------------------------------------
    def opened(self, sel: Any) -> None:
        if sel is not None:
            for tk, t in zip(sel.tickets.tolist(), sel.trees.tolist()):
                self.open_tickets.append(tk)
                self.ticket_tree[tk] = t

    def resolved(self, tickets: list[int]) -> None:
        for tk in tickets:
            self.open_tickets.remove(tk)
            self.resolved_tickets.append(tk)


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) < 300 else s[:300] + "..."


# ----------------------------------------------------------------------------------------------
# operations: each draws its arguments (sometimes invalid ones) and runs on both forests


def _pick(data: st.DataObject, pool: list[int], max_size: int = 4, unique: bool = True) -> list[int]:
    if not pool:
        return []
    idx = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=max_size,
                             unique=unique))
    return [pool[i] for i in idx]


def _maybe_corrupt_ids(data: st.DataObject, ids: list[int], stale: list[int], bogus: int) -> list[int]:
    """Sometimes replace one id by a stale or unknown one, or duplicate one."""
    kind = data.draw(st.sampled_from(["none"] * 8 + ["stale", "bogus", "dup"]))
    if kind == "none" or not ids:
        return ids
    ids = list(ids)
    j = data.draw(st.integers(0, len(ids) - 1))
    if kind == "stale" and stale:
        ids[j] = data.draw(st.sampled_from(stale))
    elif kind == "bogus":
        ids[j] = bogus
    elif kind == "dup":
        ids.append(ids[j])
    return ids


def _values(data: st.DataObject, n: int) -> list[float]:
    vals = data.draw(st.lists(VALUES, min_size=n, max_size=n))
    fault = data.draw(st.sampled_from(["none"] * 12 + ["bad", "short"]))
    if fault == "bad" and vals:
        vals[data.draw(st.integers(0, n - 1))] = data.draw(BAD_VALUES)
    elif fault == "short":
        vals = vals + [0.0]
    return vals


def op_add_trees(p: Pair, data: st.DataObject) -> None:
    payloads = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=3))
    out = p.call("add_trees", np.array(payloads, dtype=np.uint64))
    if out is not None:
        p.live.extend(out.tolist())
        p.nodes.extend(p.ref.roots(out).tolist())


def _select_kw(data: st.DataObject) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if data.draw(st.booleans()):
        kw["rule"] = data.draw(st.sampled_from(["rstar", "puct", "rstar", "puct", "bogus"]))
    if data.draw(st.integers(0, 3)) == 0:
        kw["c"] = data.draw(st.sampled_from([0.0, 0.5, 2.0, 1.25, -1.0, math.nan]))
    return kw


def op_select(p: Pair, data: st.DataObject) -> None:
    trees = _pick(data, p.live, 4, unique=False)
    trees = _maybe_corrupt_ids(data, trees, p.released, 10**6)
    k = data.draw(st.sampled_from([0, 1, 1, 1, 2, 3, 5, -1]))
    p.opened(p.call("select", np.array(trees, dtype=np.uint32), k, **_select_kw(data)))


def op_select_from(p: Pair, data: st.DataObject) -> None:
    nodes = _pick(data, p.nodes, 4, unique=False)
    nodes = _maybe_corrupt_ids(data, nodes, [], 10**7)
    k = data.draw(st.sampled_from([1, 1, 2, 3]))
    p.opened(p.call("select_from", np.array(nodes, dtype=np.uint32), k, **_select_kw(data)))


def op_expand(p: Pair, data: st.DataObject) -> None:
    tickets = _pick(data, p.open_tickets, 3)
    tickets = _maybe_corrupt_ids(data, tickets, p.resolved_tickets, (77 << 32) | 5)
    ns = data.draw(st.lists(st.integers(0, 5), min_size=len(tickets), max_size=len(tickets)))
    if data.draw(st.integers(0, 15)) == 0:
        ns = ns + [1]  # wrong length
    total = sum(ns)
    kw: dict[str, Any] = {}
    if data.draw(st.booleans()):
        pri = data.draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=total, max_size=total))
        if pri and data.draw(st.integers(0, 10)) == 0:
            pri[0] = data.draw(st.sampled_from([math.nan, -0.5, math.inf]))
        kw["priors"] = np.array(pri, dtype=np.float64)
    if data.draw(st.booleans()):
        kw["payloads"] = np.array(data.draw(st.lists(st.integers(0, 2**40), min_size=total,
                                                     max_size=total)), dtype=np.uint64)
    if data.draw(st.booleans()):
        kw["terminal"] = np.array(data.draw(st.lists(st.booleans(), min_size=total,
                                                     max_size=total)), dtype=bool)
    if data.draw(st.booleans()):
        rw = data.draw(st.lists(VALUES, min_size=total, max_size=total))
        if rw and data.draw(st.integers(0, 10)) == 0:
            rw[0] = math.nan
        kw["rewards"] = np.array(rw, dtype=np.float64)
    firsts = p.call("expand", np.array(tickets, dtype=np.uint64), np.array(ns, dtype=np.int64), **kw)
    if firsts is not None:
        for f0, n in zip(firsts.tolist(), ns):
            p.nodes.extend(range(f0, f0 + n) if n else [])


def op_set_values(p: Pair, data: st.DataObject) -> None:
    nodes = _maybe_corrupt_ids(data, _pick(data, p.nodes, 5), [], 10**7)
    p.call("set_values", np.array(nodes, dtype=np.uint32), np.array(_values(data, len(nodes))))


def op_backup(p: Pair, data: st.DataObject) -> None:
    tickets = _pick(data, p.open_tickets, 3)
    tickets = _maybe_corrupt_ids(data, tickets, p.resolved_tickets, 123456789)
    vals = _values(data, len(tickets))
    p.call("backup", np.array(tickets, dtype=np.uint64), np.array(vals))
    if p.last_ok:
        p.resolved(tickets)


def op_backup_nodes(p: Pair, data: st.DataObject) -> None:
    nodes = _maybe_corrupt_ids(data, _pick(data, p.nodes, 4, unique=False), [], 10**7)
    p.call("backup_nodes", np.array(nodes, dtype=np.uint32), np.array(_values(data, len(nodes))))


def op_mark_invalid(p: Pair, data: st.DataObject) -> None:
    nodes = _maybe_corrupt_ids(data, _pick(data, p.nodes, 3), [], 10**7)
    value = data.draw(st.one_of(VALUES, BAD_VALUES)) if data.draw(st.booleans()) else -1.0
    p.call("mark_invalid", np.array(nodes, dtype=np.uint32), value)


def op_cancel(p: Pair, data: st.DataObject) -> None:
    tickets = _pick(data, p.open_tickets, 3)
    tickets = _maybe_corrupt_ids(data, tickets, p.resolved_tickets, 987654321)
    p.call("cancel", np.array(tickets, dtype=np.uint64))
    if p.last_ok:
        p.resolved(tickets)


def op_release(p: Pair, data: st.DataObject) -> None:
    trees = _maybe_corrupt_ids(data, _pick(data, p.live, 2), p.released, 10**6)
    if data.draw(st.booleans()):  # usually: resolve the trees' tickets first
        mine = [tk for tk in p.open_tickets if p.ticket_tree[tk] in trees]
        if mine:
            p.call("cancel", np.array(mine, dtype=np.uint64))
            p.resolved(mine)
    freed = p.call("release_trees", np.array(trees, dtype=np.uint32))
    if freed is not None:
        for t in trees:
            p.live.remove(t)
            p.released.append(t)


def op_read(p: Pair, data: st.DataObject) -> None:
    nodes = _maybe_corrupt_ids(data, _pick(data, p.nodes, 4, unique=False), [], 10**7)
    p.call("node_stats", np.array(nodes, dtype=np.uint32))
    if nodes:
        p.call("children", nodes[0])
    trees = _maybe_corrupt_ids(data, _pick(data, p.live, 3), p.released, 10**6)
    p.call("tree_stats", np.array(trees, dtype=np.uint32))
    p.call("roots", np.array(trees, dtype=np.uint32))


def op_rstar_rollout(p: Pair, data: st.DataObject) -> None:
    """The official rStar step: select, expand, init values, terminal backups, cancel, and
    continue from the new leaf with select_from."""
    if not p.live:
        return
    t = data.draw(st.sampled_from(p.live))
    sel = p.call("select", [t])
    depth = 0
    while sel is not None and len(sel) and depth < 4:
        tickets = sel.tickets.tolist()
        p.opened(sel)
        n = data.draw(st.integers(1, 4))
        term = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        firsts = p.call("expand", tickets, [n], terminal=term)
        if firsts is None:  # capacity
            p.call("cancel", tickets)
            p.resolved(tickets)
            return
        kids = list(range(int(firsts[0]), int(firsts[0]) + n))
        p.nodes.extend(kids)
        vals = data.draw(st.lists(VALUES, min_size=n, max_size=n))
        live_kids = [k for k, tm in zip(kids, term) if not tm]
        term_kids = [k for k, tm in zip(kids, term) if tm]
        if live_kids:
            p.call("set_values", live_kids, [v for v, tm in zip(vals, term) if not tm])
        if term_kids:
            p.call("backup_nodes", term_kids, [1.0 if v > 0 else -1.0 for v in vals[: len(term_kids)]])
        p.call("cancel", tickets)
        p.resolved(tickets)
        sel = p.call("select_from", [int(sel.nodes[0])])
        depth += 1
    p.opened(sel)


def op_cycle(p: Pair, data: st.DataObject) -> None:
    """A full batched cycle over every live tree (grows the trees quickly): select k leaves
    per tree, expand them all, initialise the children, back up some tickets, cancel the
    rest."""
    if not p.live:
        return
    k = data.draw(st.integers(1, 3))
    sel = p.call("select", p.live, k)
    if sel is None or len(sel) == 0:
        return
    p.opened(sel)
    tickets = sel.tickets.tolist()
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ns = rng.integers(0, 4, len(tickets))
    tot = int(ns.sum())
    firsts = p.call("expand", tickets, ns, priors=rng.random(tot), terminal=rng.random(tot) < 0.2)
    if firsts is not None:
        kids = [int(f0) + j for f0, n in zip(firsts.tolist(), ns.tolist()) for j in range(n)]
        p.nodes.extend(kids)
        if kids:
            p.call("set_values", kids, np.round(rng.uniform(-1, 1, len(kids)), 3))
    half = len(tickets) // 2
    p.call("backup", tickets[:half], rng.uniform(-1, 1, half))
    p.resolved(tickets[:half])
    p.call("cancel", tickets[half:])
    p.resolved(tickets[half:])


OPS = [op_add_trees, op_select, op_select, op_select_from, op_expand, op_expand, op_set_values,
       op_backup, op_backup_nodes, op_mark_invalid, op_cancel, op_release, op_read,
       op_rstar_rollout, op_rstar_rollout, op_cycle, op_cycle, op_cycle]

CONFIGS = st.fixed_dictionaries({
    "rule": st.sampled_from(["rstar", "puct"]),
    "c": st.sampled_from([2.0, 0.0, 0.5, 1.25]),
    "fpu_mode": st.sampled_from(["value", "parent"]),
    "fpu_value": st.sampled_from([0.0, -1.0, 0.25]),
    "virtual_loss": st.sampled_from([0.0, 0.0, 0.5, 1.0]),
    "max_children": st.sampled_from([4, 5, 16]),
    "max_nodes": st.sampled_from([40, 300, 100000]),
})


def run_sequence(cfg: dict[str, Any], data: st.DataObject, max_ops: int) -> Pair:
    max_nodes = cfg.pop("max_nodes")
    p = Pair(ReferenceForest(max_nodes, num_threads=1, **cfg),
             core.Forest(max_nodes, num_threads=1, **cfg))
    op_add_trees(p, data)
    n_ops = data.draw(st.integers(1, max_ops))
    for step in range(n_ops):
        op = data.draw(st.sampled_from(OPS))
        op(p, data)
        if step % 4 == 3:
            p.compare_state()
    p.compare_state()
    # drain: every open ticket resolves on both, then every tree releases
    if p.open_tickets:
        p.call("cancel", np.array(p.open_tickets, dtype=np.uint64))
        p.resolved(list(p.open_tickets))
    if p.live:
        p.call("release_trees", np.array(p.live, dtype=np.uint32))
    p.compare_state()
    assert p.ref.memory_stats()["nodes_in_use"] == 0 and p.ref.memory_stats()["tickets_open"] == 0
    logger.debug("sequence of %d calls (%d raised) agreed", p.calls, p.errors)
    return p


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=CONFIGS, data=st.data())
def test_differential_random_sequences(cfg: dict[str, Any], data: st.DataObject) -> None:
    run_sequence(cfg, data, max_ops=40)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=CONFIGS, data=st.data())
def test_differential_random_sequences_long(cfg: dict[str, Any], data: st.DataObject) -> None:
    run_sequence(cfg, data, max_ops=150)


def test_differential_big_search() -> None:
    """A larger, plain-numpy driven search (many trees, K > 1, both rules) must give the same
    trees: catches drift that only shows after hundreds of operations."""
    rng = np.random.default_rng(2024)
    for rule, vl in (("rstar", 0.0), ("puct", 0.0), ("puct", 0.5)):
        p = Pair(ReferenceForest(200000, rule=rule, c=2.0 if rule == "rstar" else 1.5,
                                 virtual_loss=vl, num_threads=1),
                 core.Forest(200000, rule=rule, c=2.0 if rule == "rstar" else 1.5,
                             virtual_loss=vl, num_threads=1))
        trees = p.call("add_trees", np.arange(16, dtype=np.uint64))
        for _ in range(30):
            sel = p.call("select", trees, 3)
            if len(sel) == 0:
                continue
            n = rng.integers(0, 6, len(sel))
            tot = int(n.sum())
            firsts = p.call("expand", sel.tickets, n, priors=rng.random(tot),
                            terminal=rng.random(tot) < 0.15, payloads=rng.integers(0, 10**9, tot))
            kids = np.concatenate([np.arange(f0, f0 + m) for f0, m in zip(firsts, n) if m] or
                                  [np.empty(0, np.int64)]).astype(np.uint32)
            if kids.size:
                p.call("set_values", kids, rng.uniform(-1, 1, kids.size))
            half = len(sel) // 2
            p.call("backup", sel.tickets[:half], rng.uniform(-1, 1, half))
            p.call("cancel", sel.tickets[half:])
        p.compare_state()
        assert p.ref.memory_stats()["nodes_in_use"] > 500


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("rule,vl", [("rstar", 0.0), ("puct", 0.0), ("puct", 0.5), ("rstar", 1.0)])
def test_differential_interleaved_descents(rule: str, vl: float, num_threads: int) -> None:
    """The C++ select runs several descents at once (different trees interleaved, one tree
    at a time) and, with threads, splits trees over shards. Many trees, duplicate and shuffled
    tree ids, several start nodes in one tree (select_from), K > 1 and batches big enough to
    be sharded must still give exactly the decisions of the one-after-another reference."""
    rng = np.random.default_rng(7 + num_threads)
    kw = dict(rule=rule, c=2.0 if rule == "rstar" else 1.25, virtual_loss=vl, fpu_mode="parent",
              fpu_value=0.1)
    p = Pair(ReferenceForest(400_000, num_threads=1, **kw), core.Forest(400_000, num_threads=num_threads, **kw))
    trees = p.call("add_trees", np.arange(300, dtype=np.uint64))
    for rnd in range(24):
        order = rng.permutation(trees)
        ids = np.concatenate([order, rng.choice(trees, 40)]) if rnd % 3 else order  # duplicates
        k = int(rng.integers(1, 4))
        if rnd % 4 == 3 and p.nodes:
            # several starts per tree (and repeats), in random order
            starts = rng.choice(np.array(p.nodes, dtype=np.uint32), min(200, len(p.nodes)))
            sel = p.call("select_from", starts, k)
        else:
            sel = p.call("select", ids, k)
        if sel is None or len(sel) == 0:
            continue
        n = rng.integers(0, 5, len(sel))
        tot = int(n.sum())
        firsts = p.call("expand", sel.tickets, n, priors=rng.random(tot) * 2,
                        terminal=rng.random(tot) < 0.1, payloads=rng.integers(0, 2**40, tot))
        for f0, m in zip(firsts.tolist(), n.tolist()):
            p.nodes.extend(range(f0, f0 + m))
        keep = rng.random(len(sel)) < 0.2  # some tickets stay open: pending visits in flight
        back = ~keep & (rng.random(len(sel)) < 0.8)
        p.call("backup", sel.tickets[back], rng.uniform(-1, 1, int(back.sum())))
        p.call("cancel", sel.tickets[~keep & ~back])
        if rnd % 5 == 4:
            p.call("cancel", sel.tickets[keep])
    p.compare_state()


def test_differential_nan_scores() -> None:
    """Absurd options can make PUCT scores NaN (c * P overflows to inf, times sqrt(0)): the
    engine then follows the reference's "first child, or a strictly greater score" rule."""
    kw = dict(rule="puct", c=1e300)
    p = Pair(ReferenceForest(1000, num_threads=1, **kw), core.Forest(1000, num_threads=1, **kw))
    trees = p.call("add_trees", np.arange(3, dtype=np.uint64))
    sel = p.call("select", trees)
    p.call("expand", sel.tickets, np.full(3, 4), priors=np.tile([1e38, 3e38, 2e38, 3e38], 3))
    p.call("cancel", sel.tickets)  # roots: N + O == 0, so every child's score is inf * 0 = NaN
    for _ in range(3):
        sel = p.call("select", trees, 2)
        p.call("backup", sel.tickets[::2], np.ones(len(sel.tickets[::2])))
        p.call("cancel", sel.tickets[1::2])
    p.compare_state()
