"""Pure-Python reference of the forest engine contract (``rstar/_core.pyi``).

``ReferenceForest`` implements exactly the contract of ``rstar._core.Forest``: same methods,
arguments, return types and dtypes, same exceptions (by name, from ``rstar.engine.errors``),
and the same decisions and statistics bit for bit, including node ids (free-list reuse) and
ticket ids (generation << 32 | slot). The "Exact details" section of the ``.pyi`` pins the
choices that make this possible; this module follows it line by line.

It exists to be read and to be compared against: the differential tests run random operation
sequences on both implementations and require identical results. It is single-threaded,
keeps nodes in flat Python lists indexed by node id (mirroring the C++ arena), and favours
clarity over speed (about 2,000 simulations/s measured at 1024 trees, 8 children, 64
simulations per tree, on a loaded 2-core machine). It imports without the C++ extension."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rstar.engine.errors import CapacityError, ForestStateError, UnknownIdError

__all__ = [
    "NONE",
    "UNEXPANDED",
    "EXPANDING",
    "EXPANDED",
    "TERMINAL",
    "INVALID",
    "VALUE_SCALE",
    "MAX_ABS_VALUE",
    "Selection",
    "ReferenceForest",
    "to_fixed",
]

NONE = 0xFFFFFFFF
UNEXPANDED, EXPANDING, EXPANDED, TERMINAL, INVALID = 0, 1, 2, 3, 4
VALUE_SCALE = 4294967296.0  # 2**32
MAX_ABS_VALUE = float(2**20)  # values beyond this are rejected so that W never overflows
MAX_K = 65536  # descents per start node and call; a huge k would only spin on collisions

_RULES = ("rstar", "puct")
_FPU_MODES = ("value", "parent")
_MAX_NODES_LIMIT = NONE  # ids 0 .. 2**32 - 2; NONE is reserved
_FREE = -1  # marks a free arena slot in ``_tree``


def to_fixed(v: float) -> int:
    """The fixed-point increment of W for value ``v``: floor(v * 2**32 + 0.5)."""
    return int(math.floor(v * 4294967296.0 + 0.5))


def _f32(x: float) -> float:
    """Round to float32 and back, as the C++ engine stores priors."""
    return float(np.float32(x))


@dataclass
class Selection:
    """Leaves handed out by one ``select`` call, as parallel numpy arrays (length L).

    Same attributes and dtypes as ``rstar._core.Selection``."""

    tickets: npt.NDArray[np.uint64]
    trees: npt.NDArray[np.uint32]
    nodes: npt.NDArray[np.uint32]
    depths: npt.NDArray[np.int32]
    path_offsets: npt.NDArray[np.int64]
    path_nodes: npt.NDArray[np.uint32]
    path_payloads: npt.NDArray[np.uint64]
    collisions: int = 0
    dead_ends: int = 0

    def __len__(self) -> int:
        return int(self.tickets.shape[0])


@dataclass
class _Ticket:
    """An open ticket: one claimed leaf in flight."""

    tree: int
    start: int  # pending visits were added from here down to the leaf
    leaf: int
    expanded: bool = False


@dataclass
class _Tree:
    root: int
    n_nodes: int = 1
    open_tickets: int = 0


@dataclass
class _Counters:
    selects: int = 0
    leaves: int = 0
    collisions: int = 0
    dead_ends: int = 0
    expansions: int = 0
    backups: int = 0
    cancels: int = 0


# ---------------------------------------------------------------------------------------------
# input checking (shared by all batch calls): every check runs before anything changes


def _ids(x: npt.ArrayLike, what: str) -> list[int]:
    """A 1-D array of non-negative integer ids as a list; negative ids are unknown."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {a.shape}")
    if a.size == 0:
        return []
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {a.dtype}")
    out = [int(v) for v in a.tolist()]
    return out


def _values(x: npt.ArrayLike, n: int, what: str) -> list[float]:
    """``n`` finite float64 values with abs(v) <= 2**20."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"{what} has length {a.shape[0]}, expected {n}")
    if n and not bool(np.all(np.isfinite(a))):
        raise ValueError(f"{what} must be finite (NaN or infinite value given)")
    if n and float(np.max(np.abs(a))) > MAX_ABS_VALUE:
        raise ValueError(f"{what} must satisfy abs(v) <= 2**20")
    return [float(v) for v in a.tolist()]


def _no_duplicates(ids: list[int], what: str) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate {what} in one call")


def _check_scalar_c(c: float, what: str = "c") -> float:
    c = float(c)
    if not math.isfinite(c) or c < 0.0:
        raise ValueError(f"{what} must be finite and >= 0, got {c}")
    return c


class ReferenceForest:
    """A forest of MCTS trees in pure Python; see ``rstar/_core.pyi`` for the contract."""

    def __init__(
        self,
        max_nodes: int = 1 << 26,
        *,
        rule: str = "rstar",
        c: float = 2.0,
        fpu_mode: str = "value",
        fpu_value: float = 0.0,
        virtual_loss: float = 0.0,
        max_children: int = 1024,
        num_threads: int = 0,
        seed: int = 0,
    ) -> None:
        if not 1 <= int(max_nodes) <= _MAX_NODES_LIMIT:
            raise ValueError(f"max_nodes must be in [1, 2**32 - 1], got {max_nodes}")
        if rule not in _RULES:
            raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
        if fpu_mode not in _FPU_MODES:
            raise ValueError(f"fpu_mode must be one of {_FPU_MODES}, got {fpu_mode!r}")
        if not math.isfinite(float(fpu_value)):
            raise ValueError("fpu_value must be finite")
        vl = float(virtual_loss)
        if not math.isfinite(vl) or vl < 0.0:
            raise ValueError("virtual_loss must be finite and >= 0")
        if not 1 <= int(max_children) <= 65535:
            raise ValueError(f"max_children must be in [1, 65535], got {max_children}")
        if int(num_threads) < 0:
            raise ValueError("num_threads must be >= 0")
        if int(seed) < 0:
            raise ValueError("seed must be >= 0")
        self._max_nodes = int(max_nodes)
        self._rule = rule
        self._c = _check_scalar_c(c)
        self._fpu_mode = fpu_mode
        self._fpu_value = float(fpu_value)
        self._vl = vl
        self._max_children = int(max_children)
        self._num_threads = int(num_threads) or (os.cpu_count() or 1)
        self._seed = int(seed)  # selection is deterministic; kept for the contract

        # The arena: parallel lists indexed by node id (grown to ``high_water``).
        self._parent: list[int] = []
        self._first: list[int] = []
        self._nch: list[int] = []
        self._n: list[int] = []  # N, completed visits
        self._o: list[int] = []  # O, pending visits
        self._w: list[int] = []  # W, fixed point (int, exact)
        self._init: list[float] = []  # init value, NaN when unset
        self._prior: list[float] = []  # float32-rounded
        self._reward: list[float] = []
        self._state: list[int] = []
        self._term: list[bool] = []
        self._depth: list[int] = []
        self._payload: list[int] = []
        self._tree: list[int] = []  # owning tree id, _FREE when the slot is free
        self._free: dict[int, list[int]] = {}  # block size -> LIFO stack of block starts

        self._trees: dict[int, _Tree] = {}
        self._trees_created = 0

        self._slot_gen: list[int] = []  # generation of each ticket slot (starts at 1)
        self._slot_ticket: list[_Ticket | None] = []
        self._free_slots: list[int] = []  # LIFO
        self._tickets_open = 0

        self._counters = _Counters()

    # -- properties ---------------------------------------------------------------------------
    @property
    def rule(self) -> str:
        return self._rule

    @property
    def c(self) -> float:
        return self._c

    @property
    def num_threads(self) -> int:
        return self._num_threads

    # -- arena --------------------------------------------------------------------------------
    def _plan_blocks(self, sizes: list[int]) -> None:
        """Raise CapacityError unless blocks of ``sizes`` (in order) can all be allocated:
        ``_alloc_block``'s policy replayed on counts, before anything is taken."""
        available = {n: len(stack) for n, stack in self._free.items()}
        top = len(self._parent)
        for n in sizes:
            if n == 0:
                continue
            if available.get(n, 0) > 0:
                available[n] -= 1
            elif top + n <= self._max_nodes:
                top += n
            else:
                m = self._larger_free_size(n, available)
                if m == 0:
                    raise CapacityError(
                        f"node arena full: no block of {n} nodes (max_nodes {self._max_nodes}, "
                        f"high water {top})"
                    )
                available[m] -= 1
                available[m - n] = available.get(m - n, 0) + 1

    def _larger_free_size(self, n: int, available: dict[int, int]) -> int:
        """The smallest size m > n (m <= max_children) with a free block, else 0."""
        sizes = [m for m, count in available.items() if m > n and count > 0]
        return min(sizes) if sizes else 0

    def _alloc_block(self, n: int) -> int:
        """First id of a block of ``n`` contiguous nodes (capacity already checked): a free
        block of exactly n, else new nodes at the top, else the head of the smallest larger
        free block, whose remaining m - n nodes go back on the free list of size m - n."""
        stack = self._free.get(n)
        if stack:
            return stack.pop()
        if len(self._parent) + n > self._max_nodes:
            m = self._larger_free_size(n, {k: len(v) for k, v in self._free.items()})
            assert m, "capacity was checked by _plan_blocks"
            start = self._free[m].pop()
            self._free.setdefault(m - n, []).append(start + n)
            return start
        start = len(self._parent)
        grow = n
        self._parent.extend([NONE] * grow)
        self._first.extend([NONE] * grow)
        self._nch.extend([0] * grow)
        self._n.extend([0] * grow)
        self._o.extend([0] * grow)
        self._w.extend([0] * grow)
        self._init.extend([math.nan] * grow)
        self._prior.extend([0.0] * grow)
        self._reward.extend([0.0] * grow)
        self._state.extend([UNEXPANDED] * grow)
        self._term.extend([False] * grow)
        self._depth.extend([0] * grow)
        self._payload.extend([0] * grow)
        self._tree.extend([_FREE] * grow)
        return start

    def _init_node(
        self, i: int, tree: int, parent: int, depth: int, payload: int, prior: float
    ) -> None:
        self._parent[i] = parent
        self._first[i] = NONE
        self._nch[i] = 0
        self._n[i] = 0
        self._o[i] = 0
        self._w[i] = 0
        self._init[i] = math.nan
        self._prior[i] = prior
        self._reward[i] = 0.0
        self._state[i] = UNEXPANDED
        self._term[i] = False
        self._depth[i] = depth
        self._payload[i] = payload
        self._tree[i] = tree

    def _node_known(self, i: int) -> bool:
        return 0 <= i < len(self._parent) and self._tree[i] != _FREE

    def _check_nodes(self, x: npt.ArrayLike, what: str = "nodes") -> list[int]:
        ids = _ids(x, what)
        for i in ids:
            if not self._node_known(i):
                raise UnknownIdError(f"unknown node id {i}")
        return ids

    def _check_trees(self, x: npt.ArrayLike) -> list[int]:
        ids = _ids(x, "tree_ids")
        for t in ids:
            if t not in self._trees:
                raise UnknownIdError(f"unknown tree id {t}")
        return ids

    # -- tickets ------------------------------------------------------------------------------
    def _new_ticket(self, t: _Ticket) -> int:
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = len(self._slot_gen)
            self._slot_gen.append(1)
            self._slot_ticket.append(None)
        self._slot_ticket[slot] = t
        self._tickets_open += 1
        self._trees[t.tree].open_tickets += 1
        return (self._slot_gen[slot] << 32) | slot

    def _lookup_ticket(self, ticket: int) -> _Ticket:
        slot, gen = ticket & 0xFFFFFFFF, ticket >> 32
        if slot < len(self._slot_gen) and self._slot_gen[slot] == gen:
            t = self._slot_ticket[slot]
            if t is not None:
                return t
        raise UnknownIdError(f"unknown or resolved ticket {ticket}")

    def _resolve_ticket(self, ticket: int) -> _Ticket:
        slot = ticket & 0xFFFFFFFF
        t = self._slot_ticket[slot]
        assert t is not None
        self._slot_ticket[slot] = None
        # the generation wraps from 2**32 - 1 to 1 (0 never names a ticket)
        self._slot_gen[slot] = self._slot_gen[slot] + 1 if self._slot_gen[slot] < 0xFFFFFFFF else 1
        self._free_slots.append(slot)
        self._tickets_open -= 1
        self._trees[t.tree].open_tickets -= 1
        # remove the pending visits from the start node down to the leaf
        i = t.leaf
        while True:
            self._o[i] -= 1
            if i == t.start:
                break
            i = self._parent[i]
        if self._state[t.leaf] == EXPANDING:
            self._state[t.leaf] = UNEXPANDED  # the claim is given back
        return t

    def _check_tickets(self, x: npt.ArrayLike) -> list[int]:
        ids = _ids(x, "tickets")
        _no_duplicates(ids, "tickets")
        for tk in ids:
            self._lookup_ticket(tk)
        return ids

    # -- trees --------------------------------------------------------------------------------
    def add_trees(self, root_payloads: npt.ArrayLike) -> npt.NDArray[np.uint32]:
        """One new tree per payload; returns tree ids. Roots start UNEXPANDED."""
        payloads = _payloads(root_payloads, None, "root_payloads")
        self._plan_blocks([1] * len(payloads))
        out = np.empty(len(payloads), dtype=np.uint32)
        for j, p in enumerate(payloads):
            tid = self._trees_created
            self._trees_created += 1
            root = self._alloc_block(1)
            self._init_node(root, tid, NONE, 0, p, 1.0)
            self._trees[tid] = _Tree(root=root)
            out[j] = tid
        return out

    def roots(self, tree_ids: npt.ArrayLike) -> npt.NDArray[np.uint32]:
        ids = self._check_trees(tree_ids)
        return np.array([self._trees[t].root for t in ids], dtype=np.uint32)

    def live_trees(self) -> npt.NDArray[np.uint32]:
        return np.array(sorted(self._trees), dtype=np.uint32)

    def _blocks_bfs(self, root: int) -> list[tuple[int, int]]:
        """The tree's blocks (start, size) in breadth-first order, root block first."""
        blocks = [(root, 1)]
        queue = [root]
        for i in queue:  # the list grows while iterating: breadth-first
            n = self._nch[i]
            if n:
                f = self._first[i]
                blocks.append((f, n))
                queue.extend(range(f, f + n))
        return blocks

    def release_trees(self, tree_ids: npt.ArrayLike) -> int:
        """Free whole trees (no open tickets allowed); returns nodes freed."""
        ids = self._check_trees(tree_ids)
        _no_duplicates(ids, "tree ids")
        for t in ids:
            if self._trees[t].open_tickets:
                raise ForestStateError(
                    f"tree {t} has {self._trees[t].open_tickets} open tickets; resolve them first"
                )
        freed = 0
        blocks: list[tuple[int, int]] = []  # (size, start) of every released block
        for t in ids:
            for start, n in self._blocks_bfs(self._trees[t].root):
                for i in range(start, start + n):
                    self._tree[i] = _FREE
                blocks.append((n, start))
                freed += n
            del self._trees[t]
        # By size, highest start first: the LIFO lists hand them out in increasing order.
        for n, start in sorted(blocks, key=lambda b: (b[0], -b[1])):
            self._free.setdefault(n, []).append(start)
        return freed

    # -- selection ----------------------------------------------------------------------------
    def _q(self, i: int) -> float:
        n = self._n[i]
        return float(self._w[i]) / VALUE_SCALE / n if n > 0 else 0.0

    def _score(self, i: int, npe: int, parent_q: float, puct: bool, c: float) -> float:
        n, o = self._n[i], self._o[i]
        ne = n + o
        if self._vl > 0.0 and o > 0:
            q = (float(self._w[i]) / VALUE_SCALE - self._vl * o) / ne
        elif n > 0:
            q = float(self._w[i]) / VALUE_SCALE / n
        elif puct:
            q = self._fpu_value if self._fpu_mode == "value" else parent_q - self._fpu_value
        else:
            q = 0.0
        if puct:
            u = c * self._prior[i] * math.sqrt(npe) / (1.0 + ne)
        elif ne == 0 or npe <= 1:
            u = 0.0
        else:
            u = c * math.sqrt(math.log(npe) / ne)
        return q + u

    def _descend(self, start: int, puct: bool, c: float) -> tuple[int, bool, bool]:
        """One descent from ``start``: (leaf or NONE, collided, dead_end).

        The leaf, when there is one, was UNEXPANDED; the caller claims it."""
        if self._term[start]:
            return NONE, False, True
        node = start
        collided = False
        while True:
            st = self._state[node]
            if st == UNEXPANDED:
                return node, collided, False
            if st == EXPANDING:
                return NONE, True, False
            # EXPANDED and not closed: pick a child
            npe = self._n[node] + self._o[node]
            parent_q = self._q(node)
            best_any, best_any_s = NONE, -math.inf
            best, best_s = NONE, -math.inf
            any_open = False
            f = self._first[node]
            for ch in range(f, f + self._nch[node]):
                if self._term[ch]:
                    continue
                any_open = True
                s = self._score(ch, npe, parent_q, puct, c)
                if best_any == NONE or s > best_any_s:
                    best_any, best_any_s = ch, s
                if self._state[ch] != EXPANDING and (best == NONE or s > best_s):
                    best, best_s = ch, s
            if not any_open:
                self._term[node] = True  # every child terminal: close lazily
                return NONE, collided, True
            if self._state[best_any] == EXPANDING:
                collided = True
            if best == NONE:
                return NONE, True, False
            node = best

    def _path(self, leaf: int) -> list[int]:
        path = []
        i = leaf
        while i != NONE:
            path.append(i)
            i = self._parent[i]
        path.reverse()
        return path

    def _select_options(self, k: int, rule: str | None, c: float | None) -> tuple[int, bool, float]:
        """Checked (k, use puct, c) of a select call."""
        if not 0 <= int(k) <= MAX_K:
            raise ValueError(f"k must be in [0, {MAX_K}], got {k}")
        rule = self._rule if rule is None else rule
        if rule not in _RULES:
            raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
        cc = self._c if c is None else _check_scalar_c(c)
        return int(k), rule == "puct", cc

    def _select_starts(self, starts: list[int], k: int, puct: bool, cc: float) -> Selection:
        tickets: list[int] = []
        trees: list[int] = []
        leaves: list[int] = []
        depths: list[int] = []
        offsets = [0]
        path_nodes: list[int] = []
        collisions = dead_ends = 0
        for start in starts:
            tree = self._tree[start]
            for _ in range(k):
                self._counters.selects += 1
                leaf, collided, dead = self._descend(start, puct, cc)
                collisions += collided
                dead_ends += dead
                if leaf == NONE:
                    continue
                self._state[leaf] = EXPANDING
                i = leaf
                while True:  # pending visits from the start node down to the leaf
                    self._o[i] += 1
                    if i == start:
                        break
                    i = self._parent[i]
                tickets.append(self._new_ticket(_Ticket(tree=tree, start=start, leaf=leaf)))
                trees.append(tree)
                leaves.append(leaf)
                depths.append(self._depth[leaf])
                path = self._path(leaf)
                path_nodes.extend(path)
                offsets.append(len(path_nodes))
        self._counters.leaves += len(tickets)
        self._counters.collisions += collisions
        self._counters.dead_ends += dead_ends
        pn = np.array(path_nodes, dtype=np.uint32)
        return Selection(
            tickets=np.array(tickets, dtype=np.uint64),
            trees=np.array(trees, dtype=np.uint32),
            nodes=np.array(leaves, dtype=np.uint32),
            depths=np.array(depths, dtype=np.int32),
            path_offsets=np.array(offsets, dtype=np.int64),
            path_nodes=pn,
            path_payloads=np.array([self._payload[i] for i in path_nodes], dtype=np.uint64),
            collisions=collisions,
            dead_ends=dead_ends,
        )

    def select(
        self,
        tree_ids: npt.ArrayLike,
        k: int = 1,
        *,
        rule: str | None = None,
        c: float | None = None,
    ) -> Selection:
        """Up to k leaves per tree, descending from each root (k descents per tree)."""
        opts = self._select_options(k, rule, c)
        ids = self._check_trees(tree_ids)
        return self._select_starts([self._trees[t].root for t in ids], *opts)

    def select_from(
        self,
        nodes: npt.ArrayLike,
        k: int = 1,
        *,
        rule: str | None = None,
        c: float | None = None,
    ) -> Selection:
        """Same as ``select`` but each descent starts at the given node."""
        opts = self._select_options(k, rule, c)
        ids = self._check_nodes(nodes)
        return self._select_starts(ids, *opts)

    # -- expansion and values -----------------------------------------------------------------
    def expand(
        self,
        tickets: npt.ArrayLike,
        n_children: npt.ArrayLike,
        priors: npt.ArrayLike | None = None,
        payloads: npt.ArrayLike | None = None,
        terminal: npt.ArrayLike | None = None,
        rewards: npt.ArrayLike | None = None,
    ) -> npt.NDArray[np.uint32]:
        """Create children of each ticket's claimed leaf, allocated contiguously."""
        # shapes and values
        tks = _ids(tickets, "tickets")
        ns = _ids(n_children, "n_children")
        if len(ns) != len(tks):
            raise ValueError(f"n_children has length {len(ns)}, expected {len(tks)}")
        for n in ns:
            if not 0 <= n <= self._max_children:
                raise ValueError(f"n_children must be in [0, {self._max_children}], got {n}")
        total = sum(ns)
        if priors is None:
            pr = [_f32(1.0 / n) for n in ns for _ in range(n)]
        else:
            pa = np.asarray(priors, dtype=np.float64)
            if pa.ndim != 1 or pa.shape[0] != total:
                raise ValueError(f"priors must have shape ({total},), got {pa.shape}")
            pa32 = pa.astype(np.float32)
            if total and not (np.all(np.isfinite(pa32)) and np.all(pa32 >= 0)):
                raise ValueError("priors must be finite and >= 0")
            pr = [float(v) for v in pa32.tolist()]
        pl = _payloads(payloads, total, "payloads")
        if terminal is None:
            te = [False] * total
        else:
            ta = np.asarray(terminal)
            if ta.ndim != 1 or ta.shape[0] != total:
                raise ValueError(f"terminal must have shape ({total},), got {ta.shape}")
            te = [bool(v) for v in ta.astype(bool).tolist()]
        if rewards is None:
            rw = [0.0] * total
        else:
            ra = np.asarray(rewards, dtype=np.float64)
            if ra.ndim != 1 or ra.shape[0] != total:
                raise ValueError(f"rewards must have shape ({total},), got {ra.shape}")
            if total and not np.all(np.isfinite(ra)):
                raise ValueError("rewards must be finite")
            rw = [float(v) for v in ra.tolist()]
        _no_duplicates(tks, "tickets")
        # ids
        ts = [self._lookup_ticket(tk) for tk in tks]
        # states
        for tk, t in zip(tks, ts):
            if self._state[t.leaf] != EXPANDING or t.expanded:
                raise ForestStateError(f"ticket {tk}: leaf {t.leaf} was already expanded")
        # capacity
        self._plan_blocks(ns)
        # apply
        out = np.empty(len(tks), dtype=np.uint32)
        off = 0
        for j, (t, n) in enumerate(zip(ts, ns)):
            leaf = t.leaf
            t.expanded = True
            if n == 0:
                self._state[leaf] = INVALID
                self._term[leaf] = True
                out[j] = NONE
                continue
            f = self._alloc_block(n)
            d = self._depth[leaf] + 1
            for m in range(n):
                ch = f + m
                self._init_node(ch, t.tree, leaf, d, pl[off + m], pr[off + m])
                self._reward[ch] = rw[off + m]
                if te[off + m]:
                    self._state[ch] = TERMINAL
                    self._term[ch] = True
            self._first[leaf] = f
            self._nch[leaf] = n
            self._state[leaf] = EXPANDED
            self._trees[t.tree].n_nodes += n
            off += n
            out[j] = f
        self._counters.expansions += len(tks)
        return out

    def set_values(self, nodes: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Initialise nodes with a reward-model value: N += 1, W += v on the node only."""
        ids = _ids(nodes, "nodes")
        vals = _values(values, len(ids), "values")
        _no_duplicates(ids, "nodes")
        for i in ids:
            if not self._node_known(i):
                raise UnknownIdError(f"unknown node id {i}")
        for i in ids:
            if not math.isnan(self._init[i]):
                raise ForestStateError(f"node {i} already has an init value")
        for i, v in zip(ids, vals):
            self._n[i] += 1
            self._w[i] += to_fixed(v)
            self._init[i] = v

    def _add_to_root(self, i: int, v: int) -> None:
        while i != NONE:
            self._n[i] += 1
            self._w[i] += v
            i = self._parent[i]

    def backup(self, tickets: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Resolve tickets, adding (N += 1, W += v) on the leaf and every ancestor."""
        tks = _ids(tickets, "tickets")
        vals = _values(values, len(tks), "values")
        _no_duplicates(tks, "tickets")
        for tk in tks:
            self._lookup_ticket(tk)
        for tk, v in zip(tks, vals):
            t = self._resolve_ticket(tk)
            self._add_to_root(t.leaf, to_fixed(v))
        self._counters.backups += len(tks)

    def backup_nodes(self, nodes: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Add (N += 1, W += v) on each node and every ancestor up to the root."""
        ids = _ids(nodes, "nodes")
        vals = _values(values, len(ids), "values")
        for i in ids:
            if not self._node_known(i):
                raise UnknownIdError(f"unknown node id {i}")
        for i, v in zip(ids, vals):
            self._add_to_root(i, to_fixed(v))
        self._counters.backups += len(ids)

    def mark_invalid(self, nodes: npt.ArrayLike, value: float = -1.0) -> None:
        """Make unexpanded or terminal leaves INVALID and terminal, adding their own value."""
        ids = _ids(nodes, "nodes")
        (v,) = _values([value], 1, "value")
        _no_duplicates(ids, "nodes")
        for i in ids:
            if not self._node_known(i):
                raise UnknownIdError(f"unknown node id {i}")
        for i in ids:
            if self._state[i] not in (UNEXPANDED, TERMINAL):
                raise ForestStateError(
                    f"node {i} is in state {_STATE_NAMES[self._state[i]]}; only UNEXPANDED "
                    "or TERMINAL nodes can be marked invalid"
                )
        fx = to_fixed(v)
        for i in ids:
            self._state[i] = INVALID
            self._term[i] = True
            self._n[i] += 1
            self._w[i] += fx

    def cancel(self, tickets: npt.ArrayLike) -> None:
        """Resolve tickets without a value; an unexpanded claimed leaf becomes UNEXPANDED."""
        tks = self._check_tickets(tickets)
        for tk in tks:
            self._resolve_ticket(tk)
        self._counters.cancels += len(tks)

    # -- reading ------------------------------------------------------------------------------
    def _stats_of(self, ids: list[int]) -> dict[str, np.ndarray]:
        return {
            "visits": np.array([self._n[i] for i in ids], dtype=np.int64),
            "pending": np.array([self._o[i] for i in ids], dtype=np.int64),
            "value_sum": np.array([float(self._w[i]) / VALUE_SCALE for i in ids], np.float64),
            "q": np.array([self._q(i) for i in ids], dtype=np.float64),
            "init_value": np.array([self._init[i] for i in ids], dtype=np.float64),
            "prior": np.array([self._prior[i] for i in ids], dtype=np.float32),
            "reward": np.array([self._reward[i] for i in ids], dtype=np.float64),
            "state": np.array([self._state[i] for i in ids], dtype=np.uint8),
            "terminal": np.array([self._term[i] for i in ids], dtype=bool),
            "payload": np.array([self._payload[i] for i in ids], dtype=np.uint64),
        }

    def node_stats(self, nodes: npt.ArrayLike) -> dict[str, np.ndarray]:
        ids = self._check_nodes(nodes)
        out = self._stats_of(ids)
        out["parent"] = np.array([self._parent[i] for i in ids], dtype=np.uint32)
        out["first_child"] = np.array([self._first[i] for i in ids], dtype=np.uint32)
        out["n_children"] = np.array([self._nch[i] for i in ids], dtype=np.uint32)
        out["depth"] = np.array([self._depth[i] for i in ids], dtype=np.int32)
        out["tree"] = np.array([self._tree[i] for i in ids], dtype=np.uint32)
        return out

    def children(self, node: int) -> npt.NDArray[np.uint32]:
        (i,) = self._check_nodes([int(node)])
        if self._nch[i] == 0:
            return np.empty(0, dtype=np.uint32)
        f = self._first[i]
        return np.arange(f, f + self._nch[i], dtype=np.uint32)

    def tree_stats(self, tree_ids: npt.ArrayLike) -> dict[str, np.ndarray]:
        ids = self._check_trees(tree_ids)
        roots = [self._trees[t].root for t in ids]
        return {
            "root": np.array(roots, dtype=np.uint32),
            "visits": np.array([self._n[r] for r in roots], dtype=np.int64),
            "q": np.array([self._q(r) for r in roots], dtype=np.float64),
            "pending": np.array([self._o[r] for r in roots], dtype=np.int64),
            "n_nodes": np.array([self._trees[t].n_nodes for t in ids], dtype=np.int64),
            "open_tickets": np.array([self._trees[t].open_tickets for t in ids], dtype=np.int64),
            "terminal": np.array([self._term[r] for r in roots], dtype=bool),
        }

    def root_child_stats(self, tree_ids: npt.ArrayLike) -> dict[str, np.ndarray]:
        ids = self._check_trees(tree_ids)
        offsets = [0]
        kids: list[int] = []
        for t in ids:
            r = self._trees[t].root
            f = self._first[r]
            kids.extend(range(f, f + self._nch[r]))
            offsets.append(len(kids))
        st = self._stats_of(kids)
        return {
            "offsets": np.array(offsets, dtype=np.int64),
            "node": np.array(kids, dtype=np.uint32),
            "visits": st["visits"],
            "pending": st["pending"],
            "q": st["q"],
            "prior": st["prior"],
            "init_value": st["init_value"],
            "state": st["state"],
            "terminal": st["terminal"],
            "payload": st["payload"],
        }

    def _bfs(self, root: int) -> tuple[list[int], list[int]]:
        """Nodes of the tree breadth-first (children contiguous) and their parent indices."""
        order = [root]
        parent_index = [-1]
        for pos, i in enumerate(order):
            n = self._nch[i]
            if n:
                f = self._first[i]
                order.extend(range(f, f + n))
                parent_index.extend([pos] * n)
        return order, parent_index

    def export_tree(self, tree_id: int) -> dict[str, np.ndarray]:
        (t,) = self._check_trees([int(tree_id)])
        order, parent_index = self._bfs(self._trees[t].root)
        st = self._stats_of(order)
        return {
            "node": np.array(order, dtype=np.uint32),
            "parent_index": np.array(parent_index, dtype=np.int64),
            "depth": np.array([self._depth[i] for i in order], dtype=np.int32),
            "visits": st["visits"],
            "pending": st["pending"],
            "value_sum": st["value_sum"],
            "q": st["q"],
            "init_value": st["init_value"],
            "prior": st["prior"],
            "reward": st["reward"],
            "state": st["state"],
            "terminal": st["terminal"],
            "payload": st["payload"],
        }

    def export_tree_dict(self, tree_id: int) -> dict[str, Any]:
        (t,) = self._check_trees([int(tree_id)])

        def one(i: int) -> dict[str, Any]:
            init = self._init[i]
            return {
                "node": i,
                "payload": self._payload[i],
                "visits": self._n[i],
                "pending": self._o[i],
                "value_sum": float(self._w[i]) / VALUE_SCALE,
                "q": self._q(i),
                "init_value": None if math.isnan(init) else init,
                "prior": self._prior[i],
                "reward": self._reward[i],
                "state": self._state[i],
                "terminal": self._term[i],
                "children": [],
            }

        root = self._trees[t].root
        out = one(root)
        stack = [(root, out)]
        while stack:  # iterative, so deep trees cannot hit the recursion limit
            i, d = stack.pop()
            f = self._first[i]
            for ch in range(f, f + self._nch[i]):
                cd = one(ch)
                d["children"].append(cd)
                stack.append((ch, cd))
        return out

    def memory_stats(self) -> dict[str, int]:
        free = sum(n * len(s) for n, s in self._free.items())
        hw = len(self._parent)
        node_bytes = 48  # what the equivalent packed record would take; the lists take more
        return {
            "node_bytes": node_bytes,
            "max_nodes": self._max_nodes,
            "nodes_in_use": hw - free,
            "nodes_free": free,
            "high_water": hw,
            "trees_live": len(self._trees),
            "trees_created": self._trees_created,
            "tickets_open": self._tickets_open,
            "resident_bytes_estimate": hw * node_bytes,
        }

    def stats(self) -> dict[str, int]:
        c = self._counters
        return {
            "selects": c.selects,
            "leaves": c.leaves,
            "collisions": c.collisions,
            "dead_ends": c.dead_ends,
            "expansions": c.expansions,
            "backups": c.backups,
            "cancels": c.cancels,
        }

    def __repr__(self) -> str:
        return (
            f"ReferenceForest(rule={self._rule!r}, c={self._c}, trees={len(self._trees)}, "
            f"nodes={len(self._parent)})"
        )


_STATE_NAMES = {
    UNEXPANDED: "UNEXPANDED",
    EXPANDING: "EXPANDING",
    EXPANDED: "EXPANDED",
    TERMINAL: "TERMINAL",
    INVALID: "INVALID",
}


def _payloads(x: npt.ArrayLike | None, n: int | None, what: str) -> list[int]:
    """Payload ids as uint64 values (``n`` of them when given; zeros when ``x`` is None)."""
    if x is None:
        return [0] * (n or 0)
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{what} has length {a.shape[0]}, expected {n}")
    if a.size == 0:
        return []
    if a.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {a.dtype}")
    return [int(v) for v in a.astype(np.uint64).tolist()]
