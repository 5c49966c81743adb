"""Unit tests of every call and error case of the engine contract (rstar/_core.pyi).

Each test runs on both implementations: the pure-Python ``ReferenceForest`` and the C++
``rstar._core.Forest``. The C++ parameter is skipped only while the extension is not built.
Exceptions are compared by class name (the two implementations define their own classes with
the same names and the same builtin bases)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rstar.engine import EngineConfig, make_forest
from rstar.engine.reference import ReferenceForest

NONE = 0xFFFFFFFF
UNEXPANDED, EXPANDING, EXPANDED, TERMINAL, INVALID = 0, 1, 2, 3, 4
SCALE = 4294967296.0


def fx(v: float) -> int:
    """Fixed-point increment of W for value v (the rule pinned in the .pyi)."""
    return int(math.floor(v * 4294967296.0 + 0.5))


def _core_forest_cls() -> type:
    from rstar import _core  # the extension is part of the package: a missing build fails
    return _core.Forest


@pytest.fixture(params=["reference", "core"])
def make(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Factory of forests of one implementation (single-threaded, so deterministic)."""
    cls = ReferenceForest if request.param == "reference" else _core_forest_cls()

    def factory(max_nodes: int = 1 << 16, **kw: Any) -> Any:
        kw.setdefault("num_threads", 1)
        return cls(max_nodes, **kw)

    return factory


@contextlib.contextmanager
def raises_named(name: str, base: type[BaseException]) -> Iterator[Any]:
    """Expect an exception of class ``name`` that is also a ``base`` (a shared builtin)."""
    with pytest.raises(base) as info:
        yield info
    assert type(info.value).__name__ == name, f"{type(info.value).__name__}: {info.value}"


def _nan_safe(a: np.ndarray) -> list[Any]:
    """``a.tolist()`` with NaN replaced by a marker, so that equal exports compare equal."""
    return ["nan" if isinstance(x, float) and math.isnan(x) else x for x in a.tolist()]


def snapshot(f: Any) -> dict[str, Any]:
    """Everything observable about a forest, for 'nothing changed' checks."""
    out: dict[str, Any] = {"mem": f.memory_stats(), "stats": f.stats()}
    for t in f.live_trees().tolist():
        out[f"tree{t}"] = {k: _nan_safe(v) for k, v in f.export_tree(t).items()}
    out["mem"].pop("resident_bytes_estimate", None)
    return out


def star(f: Any, n: int, values: list[float] | None = None, **expand_kw: Any) -> tuple[int, int, Any]:
    """A tree whose root is expanded into ``n`` children; the root's ticket is cancelled.

    Children get ``values`` via set_values when given. Returns (tree, root, children)."""
    (t,) = f.add_trees([100]).tolist()
    sel = f.select([t])
    first = int(f.expand(sel.tickets, [n], **expand_kw)[0])
    f.cancel(sel.tickets)
    kids = np.arange(first, first + n, dtype=np.uint32)
    if values is not None:
        f.set_values(kids, values)
    return t, int(sel.nodes[0]), kids


# ------------------------------------------------------------------------------------------
# construction, constants, errors


def test_constants_and_error_hierarchy() -> None:
    from rstar.engine import errors, reference

    assert reference.NONE == NONE and reference.VALUE_SCALE == 2.0**32
    assert (reference.UNEXPANDED, reference.EXPANDING, reference.EXPANDED) == (0, 1, 2)
    assert (reference.TERMINAL, reference.INVALID) == (3, 4)
    assert issubclass(errors.UnknownIdError, KeyError)
    assert issubclass(errors.UnknownIdError, errors.ForestError)
    assert issubclass(errors.CapacityError, MemoryError)
    assert issubclass(errors.ForestStateError, RuntimeError)
    try:
        from rstar import _core
    except ImportError:
        return
    assert _core.NONE == NONE and _core.VALUE_SCALE == 2.0**32
    states = (_core.UNEXPANDED, _core.EXPANDING, _core.EXPANDED, _core.TERMINAL, _core.INVALID)
    assert states == (0, 1, 2, 3, 4)
    for name in ("ForestError", "ForestStateError", "CapacityError", "UnknownIdError"):
        ours, theirs = getattr(errors, name), getattr(_core, name)
        assert theirs.__name__ == name
        for base in (RuntimeError, KeyError, MemoryError, ValueError):
            assert issubclass(ours, base) == issubclass(theirs, base), (name, base)
    import rstar.engine as eng

    assert eng.Forest is _core.Forest and eng.Selection is _core.Selection


@pytest.mark.parametrize(
    "kw",
    [
        {"rule": "ucb"},
        {"fpu_mode": "zero"},
        {"c": float("nan")},
        {"c": -1.0},
        {"virtual_loss": -0.5},
        {"virtual_loss": float("inf")},
        {"fpu_value": float("nan")},
        {"max_children": 0},
        {"max_children": 65536},
        {"num_threads": -1},
    ],
)
def test_constructor_rejects_bad_options(make: Callable[..., Any], kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make(**kw)


def test_constructor_rejects_bad_max_nodes(make: Callable[..., Any]) -> None:
    for bad in (0, 2**32):
        with pytest.raises((ValueError, OverflowError, TypeError)):
            make(bad)


def test_properties(make: Callable[..., Any]) -> None:
    f = make(rule="puct", c=1.25, num_threads=1)
    assert f.rule == "puct" and f.c == 1.25 and f.num_threads == 1
    assert make(num_threads=0).num_threads >= 1


def test_engine_config_and_make_forest() -> None:
    cfg = EngineConfig(rule="puct", c=1.5, max_nodes=1000, num_threads=1)
    f = make_forest(cfg, reference=True)
    assert isinstance(f, ReferenceForest) and f.rule == "puct" and f.c == 1.5
    assert f.memory_stats()["max_nodes"] == 1000
    with pytest.raises(ValueError):
        EngineConfig(rule="ucb")
    with pytest.raises(ValueError):
        EngineConfig(max_nodes=0)
    try:
        from rstar import _core
    except ImportError:
        return
    g = make_forest(cfg)
    assert isinstance(g, _core.Forest) and g.rule == "puct" and g.memory_stats()["max_nodes"] == 1000


def test_reference_works_without_the_extension() -> None:
    """``rstar.engine.reference`` must import and run where ``rstar._core`` is not built;
    ``rstar.engine.Forest`` then fails with a clear ImportError."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['rstar._core'] = None\n"
        "from rstar.engine.reference import ReferenceForest\n"
        "import rstar.engine as eng\n"
        "f = ReferenceForest(10); t = f.add_trees([1]); s = f.select(t)\n"
        "f.expand(s.tickets, [2]); f.backup(s.tickets, [0.5])\n"
        "assert f.tree_stats(t)['visits'].tolist() == [1]\n"
        "try:\n    eng.Forest\nexcept ImportError as e:\n    print('ImportError', 'pip install' in str(e))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(repo))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ImportError True"


# ------------------------------------------------------------------------------------------
# trees


def test_add_trees_roots_live_release(make: Callable[..., Any]) -> None:
    f = make()
    ids = f.add_trees(np.array([7, 8, 9], dtype=np.uint64))
    assert ids.dtype == np.uint32 and ids.tolist() == [0, 1, 2]
    roots = f.roots(ids)
    assert roots.dtype == np.uint32 and len(set(roots.tolist())) == 3
    st = f.node_stats(roots)
    assert st["payload"].tolist() == [7, 8, 9]
    assert st["state"].tolist() == [UNEXPANDED] * 3
    assert st["parent"].tolist() == [NONE] * 3 and st["depth"].tolist() == [0] * 3
    assert st["tree"].tolist() == [0, 1, 2]
    assert f.live_trees().tolist() == [0, 1, 2]
    assert f.release_trees([1]) == 1
    assert f.live_trees().tolist() == [0, 2]
    assert f.add_trees([5]).tolist() == [3]  # tree ids are never reused
    assert f.add_trees([]).tolist() == []
    m = f.memory_stats()
    assert m["trees_live"] == 3 and m["trees_created"] == 4


def test_release_then_memory_reuse(make: Callable[..., Any]) -> None:
    f = make(max_nodes=64)
    t, root, kids = star(f, 4, [0.1, 0.2, 0.3, 0.4])
    m0 = f.memory_stats()
    assert m0["nodes_in_use"] == 5 and m0["high_water"] == 5 and m0["nodes_free"] == 0
    assert f.release_trees([t]) == 5
    m1 = f.memory_stats()
    assert m1["nodes_in_use"] == 0 and m1["nodes_free"] == 5 and m1["trees_live"] == 0
    with raises_named("UnknownIdError", KeyError):
        f.node_stats(kids)
    with raises_named("UnknownIdError", KeyError):
        f.select([t])
    # the same shapes again take the freed blocks: no growth above the high water mark
    t2, root2, kids2 = star(f, 4)
    m2 = f.memory_stats()
    assert m2["high_water"] == 5 and m2["nodes_free"] == 0 and m2["nodes_in_use"] == 5
    assert root2 == root and kids2.tolist() == kids.tolist()
    st = f.node_stats(kids2)  # reused nodes start clean
    assert st["visits"].tolist() == [0] * 4 and np.isnan(st["init_value"]).all()
    assert st["state"].tolist() == [UNEXPANDED] * 4


def test_released_blocks_are_reused_in_increasing_id_order(make: Callable[..., Any]) -> None:
    """release_trees pushes every released block by size, highest id first, so the searches
    that reuse them walk the arena upwards (a growing search's order), not tree by tree."""
    f = make(max_nodes=64)
    trees = f.add_trees([1, 2, 3])  # roots 0, 1, 2
    sel = f.select(trees)
    firsts = f.expand(sel.tickets, [2, 2, 2]).tolist()  # blocks 3-4, 5-6, 7-8
    f.cancel(sel.tickets)
    assert firsts == [3, 5, 7]
    f.release_trees(trees)  # pushed tree by tree, the pops would return 2, 1, 0 and 7, 5, 3
    new = f.add_trees([4, 5, 6])
    assert f.roots(new).tolist() == [0, 1, 2]
    sel = f.select(new)
    assert f.expand(sel.tickets, [2, 2, 2]).tolist() == [3, 5, 7]
    f.cancel(sel.tickets)
    assert f.memory_stats()["high_water"] == 9


def test_full_arena_splits_a_larger_free_block(make: Callable[..., Any]) -> None:
    f = make(max_nodes=6)
    t, root, kids = star(f, 4)  # nodes 0 (root) and 1..4
    assert (root, kids.tolist()) == (0, [1, 2, 3, 4])
    f.release_trees([t])
    (t2,) = f.add_trees([5]).tolist()
    assert f.roots([t2]).tolist() == [0]  # the free block of size 1
    sel = f.select([t2])
    # no free block of 3, and the top (high water 5) has room for 1 only: split the free
    # block of 4 at 1, use 1..3, and put node 4 on the free list of size 1
    assert f.expand(sel.tickets, [3]).tolist() == [1]
    f.cancel(sel.tickets)
    m = f.memory_stats()
    assert (m["high_water"], m["nodes_free"], m["nodes_in_use"]) == (5, 1, 4)
    assert f.roots(f.add_trees([6, 7])).tolist() == [4, 5]  # the split-off node, then the top
    with raises_named("CapacityError", MemoryError):
        f.add_trees([8])


def test_release_with_open_tickets_is_an_error(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1])
    sel = f.select(t)
    before = snapshot(f)
    with raises_named("ForestStateError", RuntimeError):
        f.release_trees(t)
    assert snapshot(f) == before
    f.cancel(sel.tickets)
    assert f.release_trees(t) == 1


def test_release_errors(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1, 2])
    with raises_named("UnknownIdError", KeyError):
        f.release_trees([0, 99])
    with pytest.raises(ValueError):
        f.release_trees([0, 0])
    assert f.live_trees().tolist() == [0, 1]
    assert f.release_trees(t) == 2


# ------------------------------------------------------------------------------------------
# select: the official rStar rule


def test_select_claims_root_and_returns_paths(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([11, 12])
    sel = f.select(t)
    assert len(sel) == 2
    assert sel.tickets.dtype == np.uint64 and sel.trees.dtype == np.uint32
    assert sel.nodes.dtype == np.uint32 and sel.depths.dtype == np.int32
    assert sel.path_offsets.dtype == np.int64 and sel.path_nodes.dtype == np.uint32
    assert sel.path_payloads.dtype == np.uint64
    assert sel.trees.tolist() == t.tolist() and sel.nodes.tolist() == f.roots(t).tolist()
    assert sel.path_offsets.tolist() == [0, 1, 2] and sel.path_payloads.tolist() == [11, 12]
    assert len(set(sel.tickets.tolist())) == 2
    st = f.node_stats(sel.nodes)
    assert st["state"].tolist() == [EXPANDING] * 2 and st["pending"].tolist() == [1, 1]
    # a claimed leaf is never handed out twice: the second descent is a collision
    again = f.select(t)
    assert len(again) == 0 and again.collisions == 2 and again.dead_ends == 0
    assert f.memory_stats()["tickets_open"] == 2
    s = f.stats()
    assert s["selects"] == 4 and s["leaves"] == 2 and s["collisions"] == 2


def test_rstar_exploration_is_zero_when_parent_visits_at_most_one(make: Callable[..., Any]) -> None:
    f = make()
    # middle child has the best Q; with N_parent (+O) <= 1 only Q counts
    t, root, kids = star(f, 3, [0.1, 0.5, 0.3])
    assert f.node_stats([root])["visits"][0] == 0  # set_values does not touch the parent
    sel = f.select([t])
    assert sel.nodes.tolist() == [kids[1]] and sel.depths.tolist() == [1]
    f.cancel(sel.tickets)
    f.backup_nodes([root], [0.0])  # N_parent = 1: ln 1 = 0, still Q only
    sel = f.select([t])
    assert sel.nodes.tolist() == [kids[1]]
    f.cancel(sel.tickets)


def test_rstar_score_with_exploration(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 3, [0.3, 0.5, 0.2])
    # visits: kid0 N=1 (init), kid1 N=1+6, kid2 N=1; root N=7 through the backups
    f.backup_nodes(np.full(6, kids[1], dtype=np.uint32), [0.5] * 6)
    st = f.node_stats(kids)
    npe = int(f.node_stats([root])["visits"][0])
    assert npe == 6
    scores = []
    for n, w in zip(st["visits"].tolist(), st["value_sum"].tolist()):
        q = w / n
        scores.append(q + 2.0 * math.sqrt(math.log(npe) / n))
    expected = int(np.argmax(scores))  # kid0 (0.3 + 2 sqrt(ln 6)) beats kid2 and kid1
    assert expected == 0
    sel = f.select([t])
    assert sel.nodes.tolist() == [kids[expected]]
    f.cancel(sel.tickets)
    # c = 0 per call: pure Q
    sel = f.select([t], c=0.0)
    assert sel.nodes.tolist() == [kids[1]]
    f.cancel(sel.tickets)


def test_rstar_unvisited_child_has_q_zero(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 3)
    f.set_values([kids[0], kids[2]], [-0.2, -0.1])
    sel = f.select([t])
    assert sel.nodes.tolist() == [kids[1]]  # Q = 0 beats negative Qs
    assert math.isnan(f.node_stats([kids[1]])["init_value"][0])


def test_rstar_ties_go_to_first_child(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 4)
    sel = f.select([t])
    assert sel.nodes.tolist() == [kids[0]]
    f.cancel(sel.tickets)
    f.set_values(kids, [0.25, 0.5, 0.5, 0.25])
    sel = f.select([t])
    assert sel.nodes.tolist() == [kids[1]]


def test_terminal_children_are_skipped(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 3, terminal=[True, False, True], rewards=[1.0, 0.0, -1.0])
    st = f.node_stats(kids)
    assert st["state"].tolist() == [TERMINAL, UNEXPANDED, TERMINAL]
    assert st["terminal"].tolist() == [True, False, True]
    assert st["reward"].tolist() == [1.0, 0.0, -1.0]
    assert st["visits"].tolist() == [0, 0, 0]  # nothing is backed up at creation
    f.backup_nodes([kids[0]], [1.0])  # the terminal child now has the best Q
    sel = f.select([t])
    assert sel.nodes.tolist() == [kids[1]]


def test_all_terminal_children_close_the_node_lazily(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 2, terminal=[True, True])
    assert not f.tree_stats([t])["terminal"][0]  # lazily: not yet
    sel = f.select([t])
    assert len(sel) == 0 and sel.dead_ends == 1 and sel.collisions == 0
    assert f.tree_stats([t])["terminal"][0]
    st = f.node_stats([root])
    assert st["terminal"][0] and st["state"][0] == EXPANDED
    sel = f.select([t], 3)  # the root itself is terminal now: dead ends
    assert len(sel) == 0 and sel.dead_ends == 3
    assert f.stats()["dead_ends"] == 4


def test_closing_propagates_one_level_per_descent(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 2, terminal=[True, False])
    sel = f.select([t])
    assert sel.nodes.tolist() == [kids[1]]
    f.expand(sel.tickets, [2], terminal=[True, True])
    f.cancel(sel.tickets)
    first = f.select([t])  # closes kids[1]
    assert len(first) == 0 and first.dead_ends == 1
    assert f.node_stats([kids[1]])["terminal"][0] and not f.node_stats([root])["terminal"][0]
    second = f.select([t])  # now every root child is terminal: closes the root
    assert len(second) == 0 and second.dead_ends == 1 and f.node_stats([root])["terminal"][0]


def test_expanding_children_are_skipped_and_counted(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 3, [0.9, 0.5, 0.1])
    sel = f.select([t], 4)  # c = 2, but N_parent + O stays <= 1 ... then exploration
    assert len(sel) == 3 and len(set(sel.nodes.tolist())) == 3
    assert sel.collisions >= 1 + 1  # descents 2 and 3 skip a claimed best; descent 4 has none left
    assert sel.nodes.tolist()[0] == kids[0]
    st = f.node_stats(kids)
    assert st["state"].tolist() == [EXPANDING] * 3 and st["pending"].tolist() == [1, 1, 1]
    assert f.node_stats([root])["pending"][0] == 3
    f.cancel(sel.tickets)


def test_pending_visits_do_not_change_q(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 2, [0.6, 0.2])
    q_before = f.node_stats(kids)["q"].tolist()
    sel = f.select([t])
    st = f.node_stats(kids)
    assert st["q"].tolist() == q_before and st["visits"].tolist() == [1, 1]
    assert st["pending"].tolist() == [1, 0]
    f.cancel(sel.tickets)
    assert f.node_stats(kids)["pending"].tolist() == [0, 0]


def _two_level(f: Any) -> tuple[int, int, Any, Any]:
    """root -> A (q 0.5), B (q 0.4); A -> a0, a1; B -> b0, b1 (all unvisited leaves).

    Root has N = 2 (backed up), A and B have N = 1 each."""
    (t,) = f.add_trees([0]).tolist()
    sel = f.select([t])
    first = int(f.expand(sel.tickets, [2])[0])
    f.cancel(sel.tickets)
    ab = np.array([first, first + 1], dtype=np.uint32)
    f.backup_nodes(ab, [0.5, 0.4])
    sel = f.select_from(ab)
    firsts = f.expand(sel.tickets, [2, 2])
    f.cancel(sel.tickets)
    return t, first, ab, firsts


def test_pending_visits_enter_exploration_only(make: Callable[..., Any]) -> None:
    # c = 0: exploration is off, so pending visits change nothing: both descents go into A
    f = make(c=0.0)
    t, _, ab, firsts = _two_level(f)
    sel = f.select([t], 2)
    assert sel.nodes.tolist() == [firsts[0], firsts[0] + 1]
    assert sel.collisions == 1  # descent 2 met a0 (claimed, tie-first) and took a1
    f.cancel(sel.tickets)
    # with exploration, descent 2 sees A's pending visit in N_A + O_A and the root's
    # N + O; check against the formula
    g = make(c=2.0)
    t, _, ab, firsts = _two_level(g)
    sel = g.select([t], 2)
    npe = 2 + 1  # root N = 2 and one pending visit
    s_a = 0.5 + 2.0 * math.sqrt(math.log(npe) / (1 + 1))
    s_b = 0.4 + 2.0 * math.sqrt(math.log(npe) / 1)
    assert s_b > s_a
    assert sel.nodes.tolist() == [firsts[0], firsts[1]]
    g.cancel(sel.tickets)


def test_virtual_loss_option(make: Callable[..., Any]) -> None:
    f = make(c=0.0, virtual_loss=1.0)
    t, _, ab, firsts = _two_level(f)
    sel = f.select([t], 2)
    # A's Q with one pending visit: (0.5 - 1.0 * 1) / (1 + 1) = -0.25 < 0.4: go to B
    assert sel.nodes.tolist() == [firsts[0], firsts[1]]
    f.cancel(sel.tickets)
    # off by default (see test_pending_visits_enter_exploration_only)


# ------------------------------------------------------------------------------------------
# select: PUCT


def test_puct_uses_priors(make: Callable[..., Any]) -> None:
    f = make(rule="puct", c=1.0)
    t, root, kids = star(f, 3, priors=[0.2, 0.7, 0.1])
    assert f.select([t]).nodes.tolist() == [kids[0]]  # N_parent = 0: sqrt(0) = 0, a tie
    g = make(rule="puct", c=1.0)
    t, root, kids = star(g, 3, priors=[0.2, 0.7, 0.1])
    g.backup_nodes([root], [0.0])  # N_parent = 1
    st = g.node_stats(kids)
    assert st["prior"].dtype == np.float32
    assert st["prior"].tolist() == [float(np.float32(p)) for p in (0.2, 0.7, 0.1)]
    sel = g.select([t])
    assert sel.nodes.tolist() == [kids[1]]


def test_puct_score_formula(make: Callable[..., Any]) -> None:
    f = make(rule="puct", c=1.5)
    t, root, kids = star(f, 2, [0.1, 0.3], priors=[0.8, 0.2])
    f.backup_nodes([kids[0]], [0.0])  # kid0 N = 2, W = 0.1
    npe = int(f.node_stats([root])["visits"][0])
    p = [float(np.float32(0.8)), float(np.float32(0.2))]
    s0 = fx(0.1) / SCALE / 2 + 1.5 * p[0] * math.sqrt(npe) / (1.0 + 2)
    s1 = fx(0.3) / SCALE / 1 + 1.5 * p[1] * math.sqrt(npe) / (1.0 + 1)
    sel = f.select([t])
    assert sel.nodes.tolist() == [kids[0] if s0 > s1 else kids[1]]


def test_puct_first_play_urgency(make: Callable[..., Any]) -> None:
    # unvisited children score fpu_value (+ exploration); the visited child has q = -0.5
    for fpu, expect_unvisited in ((-1.0, False), (0.0, True)):
        f = make(rule="puct", c=0.0, fpu_mode="value", fpu_value=fpu)
        t, root, kids = star(f, 3)
        f.set_values([kids[2]], [-0.5])
        sel = f.select([t])
        assert sel.nodes.tolist() == [kids[0] if expect_unvisited else kids[2]]
    # parent mode: parent Q minus the reduction; parent q = 0.3 here
    for red, expect_unvisited in ((0.5, False), (0.1, True)):
        f = make(rule="puct", c=0.0, fpu_mode="parent", fpu_value=red)
        t, root, kids = star(f, 2)
        f.backup_nodes([root], [0.3])
        f.set_values([kids[1]], [0.0])
        sel = f.select([t])
        assert sel.nodes.tolist() == [kids[0] if expect_unvisited else kids[1]]


def test_rule_override_per_call(make: Callable[..., Any]) -> None:
    f = make(rule="rstar", c=1.0)
    t, root, kids = star(f, 2, priors=[0.1, 0.9])
    assert f.select([t]).nodes.tolist() == [kids[0]]  # rstar: tie, first child
    g = make(rule="rstar", c=1.0)
    t, root, kids = star(g, 2, priors=[0.1, 0.9])
    g.backup_nodes([root], [0.0])
    assert g.select([t], rule="puct").nodes.tolist() == [kids[1]]  # puct: the prior
    with pytest.raises(ValueError):
        g.select([t], rule="ucb")
    with pytest.raises(ValueError):
        g.select([t], c=float("nan"))
    with pytest.raises(ValueError):
        g.select([t], k=-1)
    with pytest.raises(ValueError):  # k <= 65536: a huge k would only spin on collisions
        g.select([t], k=65537)
    assert len(g.select([t], k=65536)) == 1


# ------------------------------------------------------------------------------------------
# K = 1 is sequential MCTS


class _OracleNode:
    def __init__(self, parent: _OracleNode | None) -> None:
        self.parent = parent
        self.children: list[_OracleNode] = []
        self.expanded = False
        self.terminal = False
        self.n = 0
        self.w = 0
        self.prior = 1.0


def _oracle_select(root: _OracleNode, rule: str, c: float) -> _OracleNode | None:
    """Textbook sequential selection, written independently of both engines."""
    node = root
    while True:
        if node.terminal:
            return None
        if not node.expanded:
            return node
        open_kids = [ch for ch in node.children if not ch.terminal]
        if not open_kids:
            node.terminal = True
            return None
        best, best_s = None, -math.inf
        for ch in open_kids:
            q = ch.w / SCALE / ch.n if ch.n else 0.0
            if rule == "rstar":
                u = 0.0 if (ch.n == 0 or node.n <= 1) else c * math.sqrt(math.log(node.n) / ch.n)
            else:
                u = c * ch.prior * math.sqrt(node.n) / (1.0 + ch.n)
            s = q + u
            if best is None or s > best_s:
                best, best_s = ch, s
        node = best


@pytest.mark.parametrize("rule", ["rstar", "puct"])
def test_k1_equals_sequential_mcts(make: Callable[..., Any], rule: str) -> None:
    rng = np.random.default_rng(7)
    f = make(rule=rule, c=2.0 if rule == "rstar" else 1.25)
    c = f.c
    (t,) = f.add_trees([0]).tolist()
    oracle = _OracleNode(None)
    by_id: dict[int, _OracleNode] = {int(f.roots([t])[0]): oracle}
    leaves = 0
    for _ in range(150):
        expect = _oracle_select(oracle, rule, c)
        sel = f.select([t])
        if expect is None:
            assert len(sel) == 0 and sel.dead_ends == 1
            continue
        assert len(sel) == 1 and by_id[int(sel.nodes[0])] is expect
        leaves += 1
        n = int(rng.integers(1, 4))
        term = rng.random(n) < 0.25
        priors = rng.dirichlet(np.ones(n)).astype(np.float32)
        first = int(f.expand(sel.tickets, [n], priors=priors, terminal=term)[0])
        expect.expanded = True
        for j in range(n):
            ch = _OracleNode(expect)
            ch.terminal = bool(term[j])
            ch.prior = float(priors[j])
            expect.children.append(ch)
            by_id[first + j] = ch
        if rng.random() < 0.5:  # rStar style: init values on children, terminal backups
            vals = np.round(rng.uniform(-1, 1, n), 3)
            for j in range(n):
                ch = expect.children[j]
                if ch.terminal:
                    f.backup_nodes([first + j], [vals[j]])
                    node: _OracleNode | None = ch
                    while node is not None:
                        node.n += 1
                        node.w += fx(vals[j])
                        node = node.parent
                else:
                    f.set_values([first + j], [vals[j]])
                    ch.n += 1
                    ch.w += fx(vals[j])
            f.cancel(sel.tickets)
        else:  # AlphaZero style: back the leaf's value up
            v = float(np.round(rng.uniform(-1, 1), 3))
            f.backup(sel.tickets, [v])
            node = expect
            while node is not None:
                node.n += 1
                node.w += fx(v)
                node = node.parent
    assert leaves > 20
    exp = f.export_tree(t)
    for i, nid in enumerate(exp["node"].tolist()):
        o = by_id[nid]
        assert exp["visits"][i] == o.n
        assert exp["value_sum"][i] == o.w / SCALE
        assert exp["pending"][i] == 0


# ------------------------------------------------------------------------------------------
# select_from


def test_select_from_semantics(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 2, [0.5, 0.1], payloads=[21, 22])
    sel = f.select_from([kids[1]])  # start below the root, not at the best child
    assert sel.nodes.tolist() == [kids[1]] and sel.depths.tolist() == [1]
    assert sel.path_nodes.tolist() == [root, kids[1]]  # paths start at the root
    assert sel.path_payloads.tolist() == [100, 22]
    assert f.node_stats([root])["pending"][0] == 0  # pending only from the start node down
    f.expand(sel.tickets, [2], payloads=[31, 32])
    f.backup(sel.tickets, [1.0])  # the backup still goes to the root
    st = f.node_stats([root, kids[1]])
    assert st["visits"].tolist() == [1, 2] and st["pending"].tolist() == [0, 0]
    assert st["value_sum"].tolist() == [1.0, fx(0.1) / SCALE + 1.0]
    # continuing a rollout from the node just expanded descends into its best child
    sel = f.select_from([kids[1]])
    grand = f.children(int(kids[1]))
    assert sel.nodes.tolist() == [grand[0]] and sel.depths.tolist() == [2]
    assert sel.path_payloads.tolist() == [100, 22, 31]
    f.cancel(sel.tickets)
    # a terminal start node is a dead end; a claimed start node is a collision
    f.mark_invalid([kids[0]])
    s2 = f.select_from([kids[0]])
    assert len(s2) == 0 and s2.dead_ends == 1
    s3 = f.select_from([grand[1]])
    s4 = f.select_from([grand[1]])
    assert len(s3) == 1 and len(s4) == 0 and s4.collisions == 1
    f.cancel(s3.tickets)
    with raises_named("UnknownIdError", KeyError):
        f.select_from([12345])


def test_select_many_trees_and_k(make: Callable[..., Any]) -> None:
    f = make()
    trees = []
    for _ in range(3):
        t, root, kids = star(f, 3)
        trees.append(t)
    sel = f.select(trees, 2)
    assert sel.trees.tolist() == [trees[0]] * 2 + [trees[1]] * 2 + [trees[2]] * 2
    assert np.all(np.diff(sel.path_offsets) == 2)
    ts = f.tree_stats(trees)
    assert ts["pending"].tolist() == [2, 2, 2] and ts["open_tickets"].tolist() == [2, 2, 2]
    assert f.select(trees, 0).tickets.size == 0
    f.cancel(sel.tickets)


# ------------------------------------------------------------------------------------------
# expand


def test_expand_children_and_states(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1, 2])
    sel = f.select(t)
    firsts = f.expand(sel.tickets, [3, 0], payloads=[4, 5, 6], terminal=[False, True, False],
                      rewards=[0.0, 0.75, 0.0])
    assert firsts.dtype == np.uint32 and firsts[1] == NONE
    kids = f.children(int(sel.nodes[0]))
    assert kids.dtype == np.uint32 and kids.tolist() == list(range(firsts[0], firsts[0] + 3))
    assert f.children(int(sel.nodes[1])).tolist() == []
    st = f.node_stats(kids)
    assert st["parent"].tolist() == [sel.nodes[0]] * 3 and st["depth"].tolist() == [1] * 3
    assert st["payload"].tolist() == [4, 5, 6]
    assert st["state"].tolist() == [UNEXPANDED, TERMINAL, UNEXPANDED]
    assert st["reward"].tolist() == [0.0, 0.75, 0.0]
    assert st["prior"].tolist() == [float(np.float32(1.0 / 3))] * 3
    roots = f.node_stats(sel.nodes)
    assert roots["state"].tolist() == [EXPANDED, INVALID]
    assert roots["terminal"].tolist() == [False, True]
    assert roots["visits"].tolist() == [0, 0]  # n_children = 0 adds no value
    assert roots["first_child"].tolist() == [firsts[0], NONE]
    assert roots["n_children"].tolist() == [3, 0]
    # tickets stay open after expand
    assert f.memory_stats()["tickets_open"] == 2
    assert f.stats()["expansions"] == 2
    assert f.tree_stats(t)["n_nodes"].tolist() == [4, 1]
    f.cancel(sel.tickets)
    assert f.node_stats(sel.nodes)["state"].tolist() == [EXPANDED, INVALID]


def test_expand_twice_is_an_error(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1])
    sel = f.select(t)
    f.expand(sel.tickets, [2])
    before = snapshot(f)
    with raises_named("ForestStateError", RuntimeError):
        f.expand(sel.tickets, [2])
    assert snapshot(f) == before
    f.cancel(sel.tickets)
    with raises_named("UnknownIdError", KeyError):  # resolved ticket
        f.expand(sel.tickets, [2])


def test_expand_bad_input(make: Callable[..., Any]) -> None:
    f = make(max_children=4)
    t = f.add_trees([1, 2])
    sel = f.select(t)
    tk = sel.tickets
    before = snapshot(f)
    bad_calls = [
        lambda: f.expand(tk, [1]),  # lengths differ
        lambda: f.expand(tk, [1, 1], priors=[0.5]),
        lambda: f.expand(tk, [1, 1], payloads=[1, 2, 3]),
        lambda: f.expand(tk, [1, 1], terminal=[True]),
        lambda: f.expand(tk, [1, 1], rewards=[0.0, 0.0, 0.0]),
        lambda: f.expand(tk, [1, 1], priors=[0.5, float("nan")]),
        lambda: f.expand(tk, [1, 1], priors=[0.5, -0.5]),
        lambda: f.expand(tk, [1, 1], rewards=[0.0, float("inf")]),
        lambda: f.expand(tk, [5, 1]),  # above max_children
        lambda: f.expand(tk, [-1, 1]),
        lambda: f.expand([tk[0], tk[0]], [1, 1]),  # duplicate ticket
        lambda: f.expand(np.zeros((2, 1), dtype=np.uint64), [1, 1]),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
        assert snapshot(f) == before
    with raises_named("UnknownIdError", KeyError):
        f.expand([int(tk[0]), 777], [1, 1])
    assert snapshot(f) == before
    f.expand(tk, [4, 1])
    f.cancel(tk)


def test_capacity_exhausted(make: Callable[..., Any]) -> None:
    f = make(max_nodes=6)
    t = f.add_trees([1])
    sel = f.select(t)
    f.expand(sel.tickets, [3])
    f.cancel(sel.tickets)
    sel = f.select(t)  # a child, claimed
    before = snapshot(f)
    with raises_named("CapacityError", MemoryError):
        f.expand(sel.tickets, [3])  # 4 + 3 > 6
    assert snapshot(f) == before
    assert f.node_stats(sel.nodes)["state"][0] == EXPANDING
    with raises_named("CapacityError", MemoryError):
        f.add_trees([1, 2, 3])
    assert f.live_trees().tolist() == [0]
    f.expand(sel.tickets, [2])  # exactly full
    assert f.memory_stats()["nodes_in_use"] == 6
    f.cancel(sel.tickets)


# ------------------------------------------------------------------------------------------
# values


def test_set_values_once_only(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 2)
    f.set_values(kids[:1], [0.25])
    st = f.node_stats(kids)
    assert st["visits"].tolist() == [1, 0] and st["init_value"][0] == 0.25
    assert st["value_sum"][0] == fx(0.25) / SCALE and st["q"][0] == 0.25
    assert f.node_stats([root])["visits"][0] == 0  # the node only
    before = snapshot(f)
    with raises_named("ForestStateError", RuntimeError):
        f.set_values(kids, [0.1, 0.2])  # kid 0 already has one: nothing changes
    assert snapshot(f) == before
    with pytest.raises(ValueError):
        f.set_values([kids[1], kids[1]], [0.1, 0.2])
    assert snapshot(f) == before


def test_fixed_point_rounding(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 4)
    vals = [0.1, -0.1, 1.0 / 3.0, -(2.0**-33)]
    f.set_values(kids, vals)
    st = f.node_stats(kids)
    assert st["value_sum"].tolist() == [fx(v) / SCALE for v in vals]
    assert st["init_value"].tolist() == vals  # the init value is kept exactly
    with pytest.raises(ValueError):
        f.backup_nodes([root], [2.0**21])  # abs(v) <= 2**20


def test_backup_to_root(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1])
    s1 = f.select(t)
    f.expand(s1.tickets, [2])
    f.backup(s1.tickets, [0.5])  # root N = 1, W = 0.5
    s2 = f.select(t)
    f.expand(s2.tickets, [2])
    path = s2.path_nodes.tolist()
    assert len(path) == 2
    f.backup(s2.tickets, [-0.25])
    st = f.node_stats(path)
    assert st["visits"].tolist() == [2, 1]
    assert st["value_sum"].tolist() == [(fx(0.5) + fx(-0.25)) / SCALE, fx(-0.25) / SCALE]
    assert st["pending"].tolist() == [0, 0]
    assert f.tree_stats(t)["q"][0] == (fx(0.5) + fx(-0.25)) / SCALE / 2
    assert f.stats()["backups"] == 2 and f.memory_stats()["tickets_open"] == 0


def test_backup_without_expand_releases_the_claim(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1])
    sel = f.select(t)
    f.backup(sel.tickets, [0.3])
    st = f.node_stats(sel.nodes)
    assert st["state"][0] == UNEXPANDED and st["visits"][0] == 1 and st["pending"][0] == 0


def test_backup_nodes(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 2, terminal=[True, False])
    f.backup_nodes([kids[0], kids[0], kids[1]], [1.0, -1.0, 0.5])  # duplicates allowed
    st = f.node_stats([root, kids[0], kids[1]])
    assert st["visits"].tolist() == [3, 2, 1]
    assert st["value_sum"].tolist() == [0.5, 0.0, 0.5]
    with raises_named("UnknownIdError", KeyError):
        f.backup_nodes([kids[0], 4242], [1.0, 1.0])
    assert f.node_stats([root])["visits"][0] == 3


def test_mark_invalid_has_no_backup(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 3, terminal=[False, True, False])
    f.mark_invalid(kids[:2])
    st = f.node_stats(kids)
    assert st["state"].tolist() == [INVALID, INVALID, UNEXPANDED]
    assert st["terminal"].tolist() == [True, True, False]
    assert st["visits"].tolist() == [1, 1, 0] and st["value_sum"].tolist() == [-1.0, -1.0, 0.0]
    assert np.isnan(st["init_value"][:2]).all()
    assert f.node_stats([root])["visits"][0] == 0
    f.mark_invalid([kids[2]], value=-0.5)
    assert f.node_stats([kids[2]])["value_sum"][0] == -0.5
    with raises_named("ForestStateError", RuntimeError):
        f.mark_invalid([kids[0]])  # already invalid
    with raises_named("ForestStateError", RuntimeError):
        f.mark_invalid([root])  # expanded
    with pytest.raises(ValueError):
        f.mark_invalid([kids[0]], value=float("nan"))
    # an all-invalid child set closes the node on the next descent
    sel = f.select([t])
    assert len(sel) == 0 and sel.dead_ends == 1


def test_mark_invalid_rejects_claimed_leaf(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1])
    sel = f.select(t)
    with raises_named("ForestStateError", RuntimeError):
        f.mark_invalid(sel.nodes)
    f.cancel(sel.tickets)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected(make: Callable[..., Any], bad: float) -> None:
    f = make()
    t, root, kids = star(f, 2)
    sel = f.select([t])
    before = snapshot(f)
    with pytest.raises(ValueError):
        f.set_values(kids, [0.1, bad])
    with pytest.raises(ValueError):
        f.backup(sel.tickets, [bad])
    with pytest.raises(ValueError):
        f.backup_nodes(kids, [bad, 0.0])
    with pytest.raises(ValueError):
        f.mark_invalid([kids[1]], bad)
    assert snapshot(f) == before
    f.cancel(sel.tickets)


def test_mismatched_lengths(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 2)
    sel = f.select([t])
    before = snapshot(f)
    with pytest.raises(ValueError):
        f.set_values(kids, [0.1])
    with pytest.raises(ValueError):
        f.backup(sel.tickets, [0.1, 0.2])
    with pytest.raises(ValueError):
        f.backup_nodes(kids, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        f.set_values(kids, [[0.1, 0.2]])
    assert snapshot(f) == before
    f.cancel(sel.tickets)


def test_unknown_ids(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 2)
    sel = f.select([t])
    before = snapshot(f)
    calls = [
        lambda: f.roots([0, 5]),
        lambda: f.select([5]),
        lambda: f.select_from([999]),
        lambda: f.node_stats([999]),
        lambda: f.children(999),
        lambda: f.tree_stats([5]),
        lambda: f.root_child_stats([5]),
        lambda: f.export_tree(5),
        lambda: f.export_tree_dict(5),
        lambda: f.set_values([999], [0.0]),
        lambda: f.backup_nodes([999], [0.0]),
        lambda: f.mark_invalid([999]),
        lambda: f.backup([int(sel.tickets[0]) + 1], [0.0]),
        lambda: f.backup([int(sel.tickets[0]) + (1 << 32)], [0.0]),
        lambda: f.cancel([12345678]),
        lambda: f.expand([12345678], [1]),
        lambda: f.release_trees([5]),
    ]
    for call in calls:
        with raises_named("UnknownIdError", KeyError):
            call()
    assert snapshot(f) == before
    f.cancel(sel.tickets)


# ------------------------------------------------------------------------------------------
# tickets: cancel and resolution


def test_cancel_returns_claimed_leaf(make: Callable[..., Any]) -> None:
    f = make()
    t, root, kids = star(f, 2, [0.4, 0.2])
    sel = f.select([t])
    leaf = int(sel.nodes[0])
    f.cancel(sel.tickets)
    st = f.node_stats([root, leaf])
    assert st["state"].tolist() == [EXPANDED, UNEXPANDED]
    assert st["pending"].tolist() == [0, 0] and st["visits"].tolist() == [0, 1]
    assert f.stats()["cancels"] == 2  # the star() root ticket and this one
    again = f.select([t])  # the leaf can be claimed again, with a new ticket
    assert again.nodes.tolist() == [leaf] and again.tickets[0] != sel.tickets[0]
    f.cancel(again.tickets)


def test_backup_after_cancel_is_an_error(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1])
    sel = f.select(t)
    f.cancel(sel.tickets)
    before = snapshot(f)
    with raises_named("UnknownIdError", KeyError):
        f.backup(sel.tickets, [1.0])
    with raises_named("UnknownIdError", KeyError):
        f.cancel(sel.tickets)
    assert snapshot(f) == before


def test_batch_is_all_or_nothing(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1, 2, 3])
    sel = f.select(t)
    f.cancel(sel.tickets[2:])
    before = snapshot(f)
    with raises_named("UnknownIdError", KeyError):
        f.backup(sel.tickets, [1.0, 1.0, 1.0])  # the third one is resolved
    assert snapshot(f) == before
    with pytest.raises(ValueError):
        f.cancel([sel.tickets[0], sel.tickets[0]])
    assert snapshot(f) == before
    f.backup(sel.tickets[:2], [1.0, 1.0])
    assert f.tree_stats(t)["visits"].tolist() == [1, 1, 0]


def test_ticket_ids_are_not_reused(make: Callable[..., Any]) -> None:
    f = make()
    t = f.add_trees([1])
    seen = set()
    for _ in range(5):
        sel = f.select(t)
        tk = int(sel.tickets[0])
        assert tk not in seen
        seen.add(tk)
        f.cancel(sel.tickets)


# ------------------------------------------------------------------------------------------
# reading: stats and exports


def test_tree_and_root_child_stats(make: Callable[..., Any]) -> None:
    f = make()
    t0, r0, k0 = star(f, 3, [0.1, 0.2, 0.3], payloads=[1, 2, 3])
    (t1,) = f.add_trees([9]).tolist()
    ts = f.tree_stats([t0, t1])
    assert set(ts) == {"root", "visits", "q", "pending", "n_nodes", "open_tickets", "terminal"}
    assert ts["root"].tolist() == [r0, int(f.roots([t1])[0])]
    assert ts["n_nodes"].tolist() == [4, 1] and ts["terminal"].dtype == bool
    rc = f.root_child_stats([t0, t1])
    assert set(rc) == {"offsets", "node", "visits", "pending", "q", "prior", "init_value",
                       "state", "terminal", "payload"}
    assert rc["offsets"].dtype == np.int64 and rc["offsets"].tolist() == [0, 3, 3]
    assert rc["node"].tolist() == k0.tolist() and rc["payload"].tolist() == [1, 2, 3]
    assert rc["q"].tolist() == [fx(v) / SCALE for v in (0.1, 0.2, 0.3)]
    assert rc["init_value"].tolist() == [0.1, 0.2, 0.3]


def _grow(f: Any, t: int, rounds: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        sel = f.select([t], 2)
        if len(sel) == 0:
            continue
        n = rng.integers(0, 4, len(sel))
        tot = int(n.sum())
        firsts = f.expand(sel.tickets, n, terminal=rng.random(tot) < 0.2,
                          payloads=rng.integers(0, 1000, tot), priors=rng.random(tot))
        kids = [int(fc) + j for fc, m in zip(firsts, n) for j in range(m)]
        if kids:
            f.set_values(kids, np.round(rng.uniform(-1, 1, len(kids)), 2))
        f.backup(sel.tickets, np.round(rng.uniform(-1, 1, len(sel)), 2))


def test_export_tree_consistency(make: Callable[..., Any]) -> None:
    f = make()
    (t,) = f.add_trees([3]).tolist()
    _grow(f, t, 25, seed=1)
    exp = f.export_tree(t)
    keys = {"node", "parent_index", "depth", "visits", "pending", "value_sum", "q", "init_value",
            "prior", "reward", "state", "terminal", "payload"}
    assert set(exp) == keys
    n = exp["node"].shape[0]
    assert n == f.tree_stats([t])["n_nodes"][0] and n > 5
    assert all(v.shape == (n,) for v in exp.values())
    dtypes = {"node": np.uint32, "parent_index": np.int64, "depth": np.int32, "visits": np.int64,
              "pending": np.int64, "value_sum": np.float64, "q": np.float64,
              "init_value": np.float64, "prior": np.float32, "reward": np.float64,
              "state": np.uint8, "terminal": np.bool_, "payload": np.uint64}
    for k, dt in dtypes.items():
        assert exp[k].dtype == dt, k
    pi = exp["parent_index"]
    assert pi[0] == -1 and np.all(pi[1:] < np.arange(1, n)) and np.all(pi[1:] >= 0)
    assert np.all(np.diff(pi[1:]) >= 0)  # breadth first: children of one parent contiguous
    assert np.all(exp["depth"][1:] == exp["depth"][pi[1:]] + 1)
    stats = f.node_stats(exp["node"])
    assert np.array_equal(stats["parent"][1:], exp["node"][pi[1:]])
    for k in ("visits", "value_sum", "q", "prior", "payload", "state", "terminal"):
        assert np.array_equal(stats[k], exp[k]), k
    visited = exp["visits"] > 0
    assert np.array_equal(exp["q"][visited], exp["value_sum"][visited] / exp["visits"][visited])
    assert np.all(exp["q"][~visited] == 0.0)
    # each node's children, as export_tree lists them, are children()
    for i in range(n):
        kids = exp["node"][pi == i]
        assert kids.tolist() == f.children(int(exp["node"][i])).tolist()


def test_export_tree_dict_is_json_and_matches(make: Callable[..., Any]) -> None:
    f = make()
    (t,) = f.add_trees([3]).tolist()
    _grow(f, t, 15, seed=2)
    d = f.export_tree_dict(t)
    text = json.dumps(d, allow_nan=False)  # plain JSON, no NaN
    d2 = json.loads(text)
    exp = f.export_tree(t)
    flat: list[dict[str, Any]] = []
    queue = [d2]
    for node in queue:  # breadth first, like export_tree
        flat.append(node)
        queue.extend(node["children"])
    assert [x["node"] for x in flat] == exp["node"].tolist()
    for i, x in enumerate(flat):
        assert {"node", "payload", "visits", "pending", "value_sum", "q", "init_value", "prior",
                "reward", "state", "terminal", "children"} <= set(x)
        assert x["visits"] == exp["visits"][i] and x["q"] == exp["q"][i]
        assert x["value_sum"] == exp["value_sum"][i] and x["payload"] == exp["payload"][i]
        assert x["state"] == exp["state"][i] and x["terminal"] == bool(exp["terminal"][i])
        iv = exp["init_value"][i]
        assert (x["init_value"] is None) if np.isnan(iv) else (x["init_value"] == iv)
        assert x["prior"] == float(exp["prior"][i])
        if x["visits"]:
            assert x["q"] == x["value_sum"] / x["visits"]


def test_memory_and_counter_keys(make: Callable[..., Any]) -> None:
    f = make(max_nodes=1000)
    m = f.memory_stats()
    assert set(m) == {"node_bytes", "max_nodes", "nodes_in_use", "nodes_free", "high_water",
                      "trees_live", "trees_created", "tickets_open", "resident_bytes_estimate"}
    assert m["max_nodes"] == 1000 and 0 < m["node_bytes"] <= 64 and m["nodes_in_use"] == 0
    assert set(f.stats()) == {"selects", "leaves", "collisions", "dead_ends", "expansions",
                              "backups", "cancels"}
    assert all(isinstance(v, int) for v in list(m.values()) + list(f.stats().values()))


def test_input_dtypes_are_flexible(make: Callable[..., Any]) -> None:
    # lists, int64 and uint32 arrays are all accepted for ids
    f = make()
    t = f.add_trees(np.array([1, 2], dtype=np.int64))
    sel = f.select(np.asarray(t, dtype=np.int64))
    f.expand(sel.tickets.tolist(), np.array([1, 1], dtype=np.int32))
    f.backup(sel.tickets, np.array([0.5, 0.5], dtype=np.float32))
    assert f.tree_stats(t.tolist())["visits"].tolist() == [1, 1]
