"""Concurrency tests of the C++ forest: many Python threads, the GIL released in every call.

Threads hammer one forest (one shared tree, or one tree each) with select / expand /
set_values / backup / backup_nodes / cancel. Each thread records what it did; afterwards
every invariant must hold:

* no lost update: each node's N and W equal its own initialisations plus every value that
  was backed up from a node of its subtree (so the root's W is the sum of all backed-up
  values), computed from the threads' records;
* N and O consistent: no pending visit is left once every ticket is resolved;
* every ticket resolved exactly once (a second resolve raises UnknownIdError; racing
  resolvers: exactly one wins);
* no leaf handed out twice while claimed.

Also: the internal thread pool (num_threads > 1) on big batches gives the same trees as one
thread, and num_threads = 1 with a fixed seed is deterministic across runs."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

logger = logging.getLogger(__name__)

core = pytest.importorskip("rstar._core", reason="rstar._core is not built yet")

SCALE = 4294967296.0
EXPANDING = 1


def fx(v: float) -> int:
    return int(math.floor(v * 4294967296.0 + 0.5))


@dataclass
class Record:
    """What one thread did (merged after the run)."""

    end_n: Counter[int] = field(default_factory=Counter)  # backups ending at a node
    end_w: Counter[int] = field(default_factory=Counter)
    own_n: Counter[int] = field(default_factory=Counter)  # set_values on a node
    own_w: Counter[int] = field(default_factory=Counter)
    tickets: list[int] = field(default_factory=list)
    leaves: int = 0
    collisions: int = 0
    errors: list[str] = field(default_factory=list)


class ClaimBook:
    """Leaves currently claimed by a ticket, shared by all threads: a leaf handed out while
    it is in here was handed out twice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claimed: set[int] = set()
        self.double: list[int] = []

    def claim(self, leaves: list[int]) -> None:
        with self._lock:
            for leaf in leaves:
                if leaf in self._claimed:
                    self.double.append(leaf)
                self._claimed.add(leaf)

    def release(self, leaves: list[int]) -> None:
        # called *before* the engine call that gives the claim back, so that a new claim
        # of the same leaf by another thread can only come after it
        with self._lock:
            self._claimed.difference_update(leaves)


def worker(f: Any, trees: list[int], rounds: int, seed: int, rec: Record, book: ClaimBook,
           barrier: threading.Barrier) -> None:
    rng = np.random.default_rng(seed)
    barrier.wait()
    try:
        for _ in range(rounds):
            k = int(rng.integers(1, 4))
            sel = f.select(trees, k)
            rec.collisions += sel.collisions
            if len(sel) == 0:
                continue
            tickets = sel.tickets.tolist()
            leaves = sel.nodes.tolist()
            book.claim(leaves)
            rec.tickets.extend(tickets)
            rec.leaves += len(tickets)
            # expand about 3/4 of the leaves (rarely with no children: the leaf turns INVALID)
            do = rng.random(len(tickets)) < 0.75
            exp_t = [t for t, d in zip(tickets, do) if d]
            if exp_t:
                ns = np.where(rng.random(len(exp_t)) < 0.02, 0, rng.integers(2, 6, len(exp_t)))
                tot = int(ns.sum())
                firsts = f.expand(exp_t, ns, priors=rng.random(tot), terminal=rng.random(tot) < 0.08)
                kids = [int(a) + j for a, n in zip(firsts.tolist(), ns.tolist()) for j in range(n)]
                if kids:
                    vals = np.round(rng.uniform(-1, 1, len(kids)), 3)
                    f.set_values(kids, vals)
                    for i, v in zip(kids, vals.tolist()):
                        rec.own_n[i] += 1
                        rec.own_w[i] += fx(v)
                    if rng.random() < 0.3:  # terminal-guided annotation of one child
                        i = kids[0]
                        f.backup_nodes([i], [1.0])
                        rec.end_n[i] += 1
                        rec.end_w[i] += fx(1.0)
            # resolve: half backup, the rest cancel
            book.release(leaves)
            vals = np.round(rng.uniform(-1, 1, len(tickets)), 3)
            back = rng.random(len(tickets)) < 0.5
            bt = [t for t, b in zip(tickets, back) if b]
            if bt:
                f.backup(bt, vals[back])
                for leaf, v in zip(np.asarray(leaves)[back].tolist(), vals[back].tolist()):
                    rec.end_n[leaf] += 1
                    rec.end_w[leaf] += fx(v)
            ct = [t for t, b in zip(tickets, back) if not b]
            if ct:
                f.cancel(ct)
    except Exception as exc:  # noqa: BLE001 - reported by the main thread
        rec.errors.append(f"{type(exc).__name__}: {exc}")


def run_threads(f: Any, tree_sets: list[list[int]], rounds: int) -> tuple[list[Record], ClaimBook]:
    book = ClaimBook()
    recs = [Record() for _ in tree_sets]
    barrier = threading.Barrier(len(tree_sets))
    threads = [threading.Thread(target=worker, args=(f, ts, rounds, 100 + i, recs[i], book, barrier))
               for i, ts in enumerate(tree_sets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a worker thread hung"
    errors = [e for r in recs for e in r.errors]
    assert not errors, errors[:5]
    return recs, book


def check_invariants(f: Any, trees: list[int], recs: list[Record]) -> None:
    """Every node's N, W from the records; no pending visits, no open tickets."""
    end_n: Counter[int] = Counter()
    end_w: Counter[int] = Counter()
    own_n: Counter[int] = Counter()
    own_w: Counter[int] = Counter()
    for r in recs:
        end_n.update(r.end_n)
        end_w.update(r.end_w)
        own_n.update(r.own_n)
        own_w.update(r.own_w)
    mem = f.memory_stats()
    assert mem["tickets_open"] == 0
    ts = f.tree_stats(trees)
    assert ts["open_tickets"].tolist() == [0] * len(trees)
    if sorted(trees) == sorted(f.live_trees().tolist()):
        assert int(ts["n_nodes"].sum()) == mem["nodes_in_use"]
    total_root_w = 0
    for t in trees:
        exp = f.export_tree(t)
        ids = exp["node"].tolist()
        pi = exp["parent_index"].tolist()
        sub_n = [end_n[i] for i in ids]
        sub_w = [end_w[i] for i in ids]
        for j in range(len(ids) - 1, 0, -1):
            sub_n[pi[j]] += sub_n[j]
            sub_w[pi[j]] += sub_w[j]
        assert exp["pending"].tolist() == [0] * len(ids), f"tree {t}: pending left"
        assert exp["visits"].tolist() == [own_n[i] + s for i, s in zip(ids, sub_n)], f"tree {t}: N"
        want_w = [float(own_w[i] + s) / SCALE for i, s in zip(ids, sub_w)]
        assert exp["value_sum"].tolist() == want_w, f"tree {t}: W (lost update)"
        assert EXPANDING not in exp["state"].tolist(), f"tree {t}: a leaf is still claimed"
        total_root_w += sub_w[0] + own_w[ids[0]]
    # the sum of everything backed up equals the sum of the roots' W
    assert total_root_w == sum(end_w.values()) + sum(own_w[int(r)] for r in ts["root"])


def check_tickets(f: Any, recs: list[Record]) -> None:
    """Ticket ids are unique over the run, and every one is resolved (a second resolve fails)."""
    all_tickets = [t for r in recs for t in r.tickets]
    assert len(all_tickets) == len(set(all_tickets)), "a ticket id was handed out twice"
    sample = all_tickets[:: max(1, len(all_tickets) // 200)]
    for tk in sample:
        with pytest.raises(KeyError) as info:
            f.cancel([tk])
        assert type(info.value).__name__ == "UnknownIdError"


@pytest.mark.parametrize("num_threads", [1, 4])
def test_many_threads_one_tree(num_threads: int) -> None:
    f = core.Forest(1 << 20, num_threads=num_threads)
    (t,) = f.add_trees([0]).tolist()
    recs, book = run_threads(f, [[t]] * 8, rounds=300)
    assert not book.double, f"leaves handed out twice: {book.double[:10]}"
    assert sum(r.leaves for r in recs) > 100
    check_invariants(f, [t], recs)
    check_tickets(f, recs)
    st = f.stats()
    assert st["leaves"] == sum(r.leaves for r in recs)
    assert st["collisions"] == sum(r.collisions for r in recs)
    assert f.export_tree(t)["node"].size > 100


def test_many_threads_own_and_shared_trees() -> None:
    f = core.Forest(1 << 20, rule="puct", c=1.5, num_threads=2)
    trees = f.add_trees(np.arange(6, dtype=np.uint64)).tolist()
    # threads 0-3 each own a tree; threads 4-7 share trees 4 and 5 and also touch all trees
    sets = [[trees[0]], [trees[1]], [trees[2]], [trees[3]], [trees[4], trees[5]],
            [trees[4], trees[5]], trees, trees]
    recs, book = run_threads(f, sets, rounds=150)
    assert not book.double, f"leaves handed out twice: {book.double[:10]}"
    check_invariants(f, trees, recs)
    check_tickets(f, recs)
    # released trees, then reuse under the same threads; the released ids will be reused
    # by any tree, so the first run's records of them are dropped
    gone = {i for t in trees[:3] for i in f.export_tree(t)["node"].tolist()}
    assert f.release_trees(trees[:3]) == len(gone)
    for r in recs:
        for c in (r.end_n, r.end_w, r.own_n, r.own_w):
            for i in gone & set(c):
                del c[i]
    more = f.add_trees(np.arange(3, dtype=np.uint64)).tolist()
    live = trees[3:] + more
    recs2, book2 = run_threads(f, [[t] for t in live] + [live, live], rounds=60)
    assert not book2.double
    check_invariants(f, live, [*recs, *recs2])


def test_racing_resolution_each_ticket_once() -> None:
    """Several threads try to cancel / back up the same tickets: exactly one wins each."""
    f = core.Forest(1 << 16, num_threads=1)
    trees = f.add_trees(np.arange(5000, dtype=np.uint64))
    sel = f.select(trees)
    tickets = sel.tickets.tolist()
    wins: list[Counter[int]] = [Counter() for _ in range(6)]
    barrier = threading.Barrier(6)

    def racer(i: int) -> None:
        order = np.random.default_rng(i).permutation(len(tickets))
        barrier.wait()
        for j in order.tolist():
            try:
                if i % 2:
                    f.backup([tickets[j]], [1.0])
                else:
                    f.cancel([tickets[j]])
            except KeyError:
                continue
            wins[i][tickets[j]] += 1

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    total = sum(wins, Counter())
    assert sorted(total) == sorted(tickets) and set(total.values()) == {1}
    backed = sum(sum(w.values()) for i, w in enumerate(wins) if i % 2)
    ts = f.tree_stats(trees)
    assert int(ts["visits"].sum()) == backed
    assert np.all(ts["q"][ts["visits"] > 0] == 1.0)
    logger.info("racing: %d backed up, %d cancelled", backed, len(tickets) - backed)
    assert f.memory_stats()["tickets_open"] == 0 and int(ts["pending"].sum()) == 0


def test_gil_is_released_during_calls() -> None:
    """A Python thread keeps running while another thread is inside a big engine call."""
    f = core.Forest(1 << 22, num_threads=1)
    trees = f.add_trees(np.zeros(100_000, dtype=np.uint64))
    sel = f.select(trees)
    f.expand(sel.tickets, np.full(len(sel), 4))
    f.cancel(sel.tickets)
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    th = threading.Thread(target=spin)
    th.start()
    progressed = 0
    try:
        for _ in range(6):
            before = counter[0]
            s = f.select(trees, 2)  # ~10^5 trees: long enough for the spinner to run
            f.cancel(s.tickets)
            progressed += counter[0] > before
    finally:
        stop.set()
        th.join()
    assert progressed >= 3, "no Python progress while the engine ran: GIL held?"


def _drive(f: Any, n_trees: int, rounds: int, seed: int) -> list[int]:
    """A deterministic batched search; per-tree values depend only on (round, tree, slot)."""
    rng = np.random.default_rng(seed)
    trees = f.add_trees(np.arange(n_trees, dtype=np.uint64)).tolist()
    for r in range(rounds):
        sel = f.select(trees, 2)
        if len(sel) == 0:
            continue
        # children counts and values from a per-(round, tree, position) table, so that they
        # do not depend on the order the engine returns tickets in
        table_n = rng.integers(0, 4, (n_trees, 2))
        table_v = np.round(rng.uniform(-1, 1, (n_trees, 2, 4)), 3)
        pos = np.zeros(len(sel), dtype=np.int64)
        seen: Counter[int] = Counter()
        for j, t in enumerate(sel.trees.tolist()):
            pos[j] = seen[t]
            seen[t] += 1
        tr = sel.trees.astype(np.int64)
        ns = table_n[tr, pos]
        firsts = f.expand(sel.tickets, ns)
        kids, vals = [], []
        for j, (a, n) in enumerate(zip(firsts.tolist(), ns.tolist())):
            kids.extend(range(a, a + n))
            vals.extend(table_v[tr[j], pos[j], :n].tolist())
        if kids:
            f.set_values(kids, vals)
        f.backup(sel.tickets, table_v[tr, pos, 3])
    return trees


def _structural(f: Any, t: int) -> dict[str, list[Any]]:
    exp = f.export_tree(t)
    return {k: v.tolist() for k, v in exp.items() if k not in ("node",)}


def test_internal_pool_matches_one_thread_on_big_batches() -> None:
    one = core.Forest(1 << 21, num_threads=1)
    many = core.Forest(1 << 21, num_threads=4)
    assert many.num_threads == 4
    t1 = _drive(one, 3000, 12, seed=5)
    t4 = _drive(many, 3000, 12, seed=5)
    assert t1 == t4
    for t in t1[:: 97]:
        a, b = _structural(one, t), _structural(many, t)
        for k in a:
            assert a[k] == b[k] or (k == "init_value" and np.array_equal(a[k], b[k], equal_nan=True)), k
    m1, m4 = one.memory_stats(), many.memory_stats()
    assert m1["nodes_in_use"] == m4["nodes_in_use"] and m4["tickets_open"] == 0
    assert one.tree_stats(t1)["visits"].tolist() == many.tree_stats(t4)["visits"].tolist()


def test_deterministic_with_one_thread_and_a_seed() -> None:
    exports = []
    for _ in range(2):
        f = core.Forest(1 << 20, num_threads=1, seed=42)
        trees = _drive(f, 200, 15, seed=9)
        sel = f.select(trees, 3)
        exports.append((
            sel.tickets.tolist(), sel.nodes.tolist(),
            [{k: np.asarray(v).tolist() for k, v in f.export_tree(t).items()} for t in trees[::7]],
            f.memory_stats()["high_water"], f.stats(),
        ))
        f.cancel(sel.tickets)
    a, b = exports
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and a[4] == b[4]
    for ea, eb in zip(a[2], b[2]):
        for k in ea:
            assert np.array_equal(np.array(ea[k]), np.array(eb[k]), equal_nan=True), k


def test_threads_with_internal_pool_and_releases() -> None:
    """Python threads each run batched calls over many trees while the internal pool is on,
    then release everything: memory accounting must close."""
    f = core.Forest(1 << 21, num_threads=2)
    trees = f.add_trees(np.arange(2000, dtype=np.uint64)).tolist()
    chunks = [trees[i::4] for i in range(4)]
    t0 = time.perf_counter()
    recs, book = run_threads(f, chunks, rounds=15)
    logger.info("4 threads x 500 trees x 15 rounds: %.2f s", time.perf_counter() - t0)
    assert not book.double
    check_invariants(f, trees, recs)
    freed = f.release_trees(trees)
    mem = f.memory_stats()
    assert freed > 2000 and mem["nodes_in_use"] == 0 and mem["nodes_free"] == mem["high_water"]
