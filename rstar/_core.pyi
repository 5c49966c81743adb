"""Type stubs for ``rstar._core``, the C++ forest engine (csrc/, bound with pybind11).

This file is the contract shared by the C++ engine and the pure-Python reference
(``rstar.engine.reference.ReferenceForest``); differential tests hold both to it.

Concepts
--------
* A **forest** holds many trees. Node ids (uint32) are global to the forest; tree ids
  (uint32) are never reused within a forest. Released trees return their nodes to
  size-class free lists that later expansions reuse.
* Every node carries a 64-bit **payload** chosen by the caller (an index into the
  caller's own store of text / token ids); the engine never sees text.
* Node state: ``UNEXPANDED`` -> ``EXPANDING`` (claimed by a ticket) -> ``EXPANDED``;
  ``TERMINAL`` (created terminal by ``expand``) and ``INVALID`` (``mark_invalid``).
  Independently, the ``terminal`` flag marks nodes that selection skips: terminal
  and invalid leaves, and expanded nodes whose children are all terminal (closed
  lazily, when a descent reaches them, exactly as the official rStar-Math code does).
* Statistics: N (completed visits), O (pending visits in flight), W (value sum in
  fixed point, ``round(v * 2**32)`` per added value, int64 atomic adds). Q = W / 2**32 / N
  (0.0 when N == 0).
* A **ticket** is one leaf in flight: ``select`` adds O+1 on every node of the path
  from the start node (root or the given node) to the leaf, and claims the leaf
  (UNEXPANDED -> EXPANDING) when it is unexpanded. A ticket is resolved exactly once,
  by ``backup`` (adds a value) or ``cancel`` (adds none); both remove its pending
  visits. ``expand`` needs an open ticket that owns the leaf and does not resolve it.

Selection rules (exact; ties go to the first child; terminal children are skipped;
children in state EXPANDING are skipped and counted as collisions when they would
otherwise have been chosen). With Ne = N + O for the child and Npe = N + O for the parent:

* ``"rstar"``: ``Q + c * sqrt(log(Npe) / Ne)``; the exploration term is 0 when Ne == 0
  or Npe <= 1; Q = 0 for an unvisited child. Default c = 2.
* ``"puct"``: ``Q + c * P * sqrt(Npe) / (1 + Ne)``; an unvisited child (N == 0) uses the
  first-play-urgency value: ``fpu_value`` (``fpu_mode="value"``) or parent Q minus
  ``fpu_value`` (``fpu_mode="parent"``).

Pending visits enter only the exploration terms. With ``virtual_loss = vl > 0`` the Q
of a child with O > 0 becomes ``(W/2**32 - vl * O) / (N + O)``.

All Python floats are computed in double precision in the same order of operations in
both implementations, so decisions agree bit for bit.

Errors: bad input raises (``ValueError`` for shapes, NaN / infinite values and invalid
options; ``KeyError`` subclasses for unknown or resolved ids; ``ForestStateError`` for
operations not allowed in the node's state; ``CapacityError`` when the node arena is
full). A batch call validates every item before changing anything.

Exact details (pinned so that the C++ engine and the Python reference agree bit for bit;
written by the reference's author, the C++ side follows them or documents otherwise here)
---------------------------------------------------------------------------------------
* Fixed point: a value v adds ``int64(floor(v * 4294967296.0 + 0.5))`` to W. Values must be
  finite with ``abs(v) <= 2**20`` (else ValueError), so W cannot overflow in practice.
  Priors are stored as float32 (P in the score is that float32 converted to double); init
  values and rewards are stored as float64.
* Scores, in double, in this order: ``q = double(W) / VALUE_SCALE / N`` (N > 0);
  rstar ``u = c * sqrt(log(Npe) / Ne)``; puct ``u = c * P * sqrt(Npe) / (1.0 + Ne)``;
  score = q + u. Virtual loss (vl > 0 and child O > 0, whatever N) replaces q by
  ``(double(W) / VALUE_SCALE - vl * O) / (N + O)``. FPU "parent" uses the parent's plain q
  (0.0 when the parent has N == 0).
* A descent scans the children left to right keeping the first strictly greater score, once
  over all non-terminal children and once over non-terminal children not in state
  EXPANDING. If the first winner is EXPANDING, the descent counts one collision (at most one
  per descent) and continues into the second winner; with no second winner the descent ends
  (a collision if some child is EXPANDING, else every child is terminal: the node gets the
  terminal flag, a dead end). The start node: terminal flag -> dead end; EXPANDING ->
  collision; UNEXPANDED -> claimed. Pending visits (O += 1 from the start node to the leaf)
  are added only when a descent claims a leaf, after it, so descent j of a call sees the
  O of descents 0..j-1. k must be in [0, 65536] (else ValueError: a huge k would spin
  on collisions). ``select`` runs, for each tree id in input order, k descents;
  results are in that order. ``path_*`` always start at the tree root (also for
  ``select_from``); ``depths`` is the leaf's depth from the root.
* Node ids: blocks (a root is a block of 1; the children of one expansion are one block)
  come from a LIFO free list of that exact size, else from the top (``high_water`` grows),
  else (C++ engine, added by its author) by splitting the free block of the smallest larger
  size m that has one: pop it, use its first n nodes, push the remaining m - n nodes as a
  block on the list of size m - n. CapacityError when none of the three applies; a batch
  checks (by replaying these rules on counts) that all its blocks fit before taking any.
  ``release_trees`` pushes the blocks of all its trees onto their lists by size, highest
  first id first, so later pops return them in increasing id order.
  ``add_trees``/``expand`` allocate in input order.
* Tickets: ``generation << 32 | slot``. Slots come from a LIFO stack of freed slots, else a
  new slot (0, 1, 2, ...); a slot's generation starts at 1 and grows by 1 each time one of
  its tickets is resolved. Tree ids are 0, 1, 2, ... in creation order.
* ``expand``: non-terminal children are UNEXPANDED; every child stores its ``rewards`` entry;
  default priors are ``float32(1.0 / n)``; priors must be finite and >= 0 after the float32
  conversion and rewards finite (else ValueError); ``n_children[i]`` must be in
  [0, max_children].
* Build with ``-ffp-contract=off`` (no FMA contraction) so that scores match Python's.
* ``backup`` of a ticket whose leaf is still EXPANDING (never expanded) returns the leaf to
  UNEXPANDED, as ``cancel`` does. ``set_values`` works on a node in any state, once.
  ``mark_invalid`` accepts UNEXPANDED and TERMINAL nodes only (else ForestStateError) and
  does not set init_value.
* Duplicate ids within one ``backup``, ``cancel``, ``expand``, ``set_values``,
  ``mark_invalid`` or ``release_trees`` call raise ValueError (``backup_nodes``,
  ``select`` and ``select_from`` accept duplicates). Validation order over the whole batch:
  shapes and values (ValueError), then ids (UnknownIdError: unknown, released or resolved),
  then states (ForestStateError), then capacity (CapacityError).
* Limits (C++): ``max_children`` <= 65535 (ValueError), ``n_children[i] < 0`` is a ValueError,
  at most 2**31 trees per forest. ``memory_stats()["node_bytes"]`` is the C++ engine's bytes
  per node: a 32-byte hot record (what selection and backup touch) plus a 24-byte cold record
  (payload, init value, reward) = 56; ``resident_bytes_estimate`` is implementation-specific.
  Neither is compared across implementations.
* Concurrency (C++; the reference is single-threaded): the rules above are what a sequence
  of calls gives. Under concurrent calls a descent that loses the claim of a leaf to another
  thread looks at that node again; a node closed or invalidated by another thread ends the
  descent as a dead end. A ticket generation wraps from 2**32 - 1 to 1. Node ids of a
  released tree are unknown until their slots are reused by a later allocation.
* Counters (``stats``): selects = descents attempted, leaves = tickets issued, collisions,
  dead_ends, expansions = tickets expanded, backups = tickets backed up plus nodes given to
  ``backup_nodes``, cancels = tickets cancelled.
* Dtypes: node ids, tree ids, parent, first_child, n_children uint32; tickets, payloads
  uint64; visits, pending, n_nodes, open_tickets, offsets int64; depth int32; state uint8;
  terminal bool; prior float32; value_sum, q, init_value, reward float64; export_tree's
  parent_index int64. ``export_tree_dict`` holds Python scalars only (init_value None when
  unset) with keys node, payload, visits, pending, value_sum, q, init_value, prior, reward,
  state, terminal, children.
"""

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

NONE: int  # 0xFFFFFFFF, "no node" in uint32 arrays
UNEXPANDED: int  # 0
EXPANDING: int  # 1
EXPANDED: int  # 2
TERMINAL: int  # 3
INVALID: int  # 4
VALUE_SCALE: float  # 2**32, fixed-point scale of W

class ForestError(RuntimeError): ...
class ForestStateError(ForestError): ...
class CapacityError(ForestError, MemoryError): ...
class UnknownIdError(ForestError, KeyError): ...

class Selection:
    """Leaves handed out by one ``select`` call, as parallel numpy arrays (length L).

    Every returned leaf was UNEXPANDED and is now EXPANDING, owned by its ticket. A
    descent that ends elsewhere returns no leaf: it is counted as a collision (all
    selectable children are being expanded) or a dead end (the node's children are
    all terminal, so the node is closed; or the start node is terminal)."""

    tickets: npt.NDArray[np.uint64]
    trees: npt.NDArray[np.uint32]
    nodes: npt.NDArray[np.uint32]  # the leaf of each ticket
    depths: npt.NDArray[np.int32]  # depth of the leaf (root = 0)
    path_offsets: npt.NDArray[np.int64]  # L + 1 offsets into the path arrays
    path_nodes: npt.NDArray[np.uint32]  # root .. leaf for each ticket, flattened
    path_payloads: npt.NDArray[np.uint64]  # payloads of path_nodes
    collisions: int  # descents that met a leaf already being expanded
    dead_ends: int  # descents that ended on a node whose children are all terminal
    def __len__(self) -> int: ...

class Forest:
    def __init__(
        self,
        max_nodes: int = 1 << 26,
        *,
        rule: Literal["rstar", "puct"] = "rstar",
        c: float = 2.0,
        fpu_mode: Literal["value", "parent"] = "value",
        fpu_value: float = 0.0,
        virtual_loss: float = 0.0,
        max_children: int = 1024,
        num_threads: int = 0,  # 0 = all cores; 1 = run on the calling thread
        seed: int = 0,
    ) -> None: ...
    @property
    def rule(self) -> str: ...
    @property
    def c(self) -> float: ...
    @property
    def num_threads(self) -> int: ...

    # trees ---------------------------------------------------------------
    def add_trees(self, root_payloads: npt.ArrayLike) -> npt.NDArray[np.uint32]:
        """One new tree per payload; returns tree ids. Roots start UNEXPANDED."""
    def roots(self, tree_ids: npt.ArrayLike) -> npt.NDArray[np.uint32]: ...
    def release_trees(self, tree_ids: npt.ArrayLike) -> int:
        """Free whole trees (no open tickets allowed); returns nodes freed."""
    def live_trees(self) -> npt.NDArray[np.uint32]: ...

    # the search cycle ----------------------------------------------------
    def select(
        self,
        tree_ids: npt.ArrayLike,
        k: int = 1,
        *,
        rule: str | None = None,
        c: float | None = None,
    ) -> Selection:
        """Up to k leaves per tree, descending from each root (k descents per tree)."""
    def select_from(
        self,
        nodes: npt.ArrayLike,
        k: int = 1,
        *,
        rule: str | None = None,
        c: float | None = None,
    ) -> Selection:
        """Same as ``select`` but each descent starts at the given node (pending visits
        are added from that node down; backups still go to the root)."""
    def expand(
        self,
        tickets: npt.ArrayLike,
        n_children: npt.ArrayLike,
        priors: npt.ArrayLike | None = None,
        payloads: npt.ArrayLike | None = None,
        terminal: npt.ArrayLike | None = None,
        rewards: npt.ArrayLike | None = None,
    ) -> npt.NDArray[np.uint32]:
        """Create children of each ticket's claimed leaf, allocated contiguously.

        ``n_children[i]`` children for ticket i; ``priors``, ``payloads``, ``terminal``,
        ``rewards`` are flat arrays of length sum(n_children) (defaults: uniform priors,
        payload 0, not terminal, reward 0). Terminal children are created in state
        TERMINAL with the terminal flag set and their reward stored (nothing is backed
        up). ``n_children[i] == 0`` marks the leaf INVALID (no value added).
        Returns the first child id per ticket (NONE when 0 children). The tickets stay
        open."""
    def set_values(self, nodes: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Initialise nodes with a reward-model value: N += 1, W += v on the node only,
        and remember v as its init value. At most once per node."""
    def backup(self, tickets: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Resolve tickets: remove their pending visits and add (N += 1, W += v) on
        the leaf and every ancestor up to the root."""
    def backup_nodes(self, nodes: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Add (N += 1, W += v) on each node and every ancestor up to the root
        (terminal-guided annotation). No ticket involved."""
    def mark_invalid(self, nodes: npt.ArrayLike, value: float = -1.0) -> None:
        """Make unexpanded or terminal leaves INVALID and terminal, adding their own
        value (N += 1, W += value) with no backup."""
    def cancel(self, tickets: npt.ArrayLike) -> None:
        """Resolve tickets without a value. A claimed leaf that was not expanded goes
        back to UNEXPANDED."""

    # reading -------------------------------------------------------------
    def node_stats(self, nodes: npt.ArrayLike) -> dict[str, np.ndarray]:
        """Keys: visits, pending, value_sum (float64, W / 2**32), q, init_value (NaN when
        unset), prior, reward, state, terminal, parent, first_child, n_children,
        depth, payload, tree."""
    def children(self, node: int) -> npt.NDArray[np.uint32]: ...
    def tree_stats(self, tree_ids: npt.ArrayLike) -> dict[str, np.ndarray]:
        """Keys: root, visits, q, pending, n_nodes, open_tickets, terminal."""
    def root_child_stats(self, tree_ids: npt.ArrayLike) -> dict[str, np.ndarray]:
        """Per-root-child statistics: offsets (len T + 1) and flat arrays node, visits,
        pending, q, prior, init_value, state, terminal, payload."""
    def export_tree(self, tree_id: int) -> dict[str, np.ndarray]:
        """Whole tree in breadth-first order (children contiguous): node, parent_index
        (-1 for the root), depth, visits, pending, value_sum, q, init_value, prior,
        reward, state, terminal, payload."""
    def export_tree_dict(self, tree_id: int) -> dict[str, Any]:
        """Nested plain dict (JSON-ready): {"node", "payload", "visits", "q", ...,
        "children": [...]}."""
    def memory_stats(self) -> dict[str, int]:
        """Keys: node_bytes, max_nodes, nodes_in_use, nodes_free, high_water,
        trees_live, trees_created, tickets_open, resident_bytes_estimate."""
    def stats(self) -> dict[str, int]:
        """Cumulative counters: selects, leaves, collisions, dead_ends, expansions,
        backups, cancels."""
