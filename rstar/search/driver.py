"""Search drivers: rStar-Math MCTS, step beam search, best-of-N and greedy over many trees.

Thousands of problems are searched at once over one generator, one scorer and one sandbox.
The trees live in the engine (``rstar.engine``): every selection, expansion and value update
is a batched engine call from the main loop; Python keeps only a per-tree node store (text,
token ids, step metadata) indexed by the engine payload ``tree_key << 32 | local_id``.

Two pipelines share all the step logic:

* ``async``: a leaf's generation request goes out as soon as it is selected
  (``Generator.agenerate``); its code runs (``Sandbox.arun``) and its children are graded and
  PPM-scored (micro-batched in worker threads) while other leaves generate. Finished
  expansions are committed to the engine in batches, and each rollout continues at once.
* ``lockstep``: one batched ``generate`` per step over every tree, then execution, then
  scoring, then one commit; rollouts start together (the official code's schedule).

MCTS follows the official rules (rstar-math.md §2): a rollout descends from the root to an
unexpanded node, expands it into ``n`` candidates (duplicates dropped, answer collapse),
then keeps descending into the best new child (``select_from``) until a descent finds no
leaf; values come from terminal grading (+-1 backed up), PPM initialisation, or PPM only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rstar.config import to_dict
from rstar.search.config import SearchConfig
from rstar.search.prompts import build_prompt, encode_continuation, encode_prompt
from rstar.search.steps import (
    END_OF_ANSWER,
    StepKind,
    classify_step,
    closes_block,
    next_error_count,
    normalise_program,
    observation_text,
    step_code,
)

logger = logging.getLogger(__name__)

_LOCAL_MASK = 0xFFFFFFFF
_KIND_NAME = {k: k.value for k in StepKind}
_CODE, _ANSWER = StepKind.CODE, StepKind.ANSWER
_MISSING = object()


# --------------------------------------------------------------------------- node store
class _Node:
    """One step of one tree (stored once; paths are assembled from the engine's path)."""

    __slots__ = (
        "parent", "depth", "text", "ids", "kind", "terminal", "valid", "reason", "answer",
        "correct", "ppm", "reward", "exec_ok", "exec_status", "timed_out", "errors", "closes",
        "eid", "local", "rollout", "code", "bcode", "full",
    )

    def __init__(self, parent: int, depth: int, text: str, ids: list[int], kind: str, errors: int = 0,
                 rollout: int = 0) -> None:
        self.parent = parent
        self.depth = depth
        self.text = text
        self.ids = ids
        self.kind = kind
        self.terminal = False
        self.valid = True
        self.reason: str | None = None
        self.answer: str | None = None
        self.correct: bool | None = None
        self.ppm: float | None = None
        self.reward: float | None = None  # the value backed up from this terminal
        self.exec_ok: bool | None = None
        self.exec_status: str | None = None
        self.timed_out = False
        self.errors = errors  # consecutive failing code steps ending here
        self.closes = False
        self.eid = -1
        self.local = 0
        self.rollout = rollout  # rollouts started in its tree when it was created (anytime metrics)
        self.code = ""  # step_code(text) of a code step, as generated
        self.bcode: str | bool | None = None  # its part of its block's code (see _block_code)
        self.full: list[int] | None = None  # prompt + path ids through it, while a rollout may continue here

    def invalidate(self, reason: str) -> None:
        self.terminal = True
        self.valid = False
        self.reason = reason


class _Tree:
    __slots__ = (
        "key", "index", "problem", "tid", "nodes", "prompt_ids", "started", "in_flight", "closed",
        "root_expanded", "beam_jobs", "level", "width", "finished", "t0", "tokens", "execs",
        "expansions", "finalizing", "pid", "seed_prefix",
    )

    def __init__(self, key: int, index: int, problem: Any, prompt_ids: list[int]) -> None:
        self.key = key
        self.index = index
        self.problem = problem
        self.pid = str(problem.id)
        self.seed_prefix = ""  # f"{base seed}|{pid}|" (set by the searcher)
        self.tid = -1
        root = _Node(-1, 0, "", [], "root")
        self.nodes: list[_Node] = [root]
        self.prompt_ids = prompt_ids
        self.started = 0  # rollouts started (mcts)
        self.in_flight = 0  # open tickets
        self.closed = False  # root closed / beam or chains finished
        self.root_expanded = False
        self.beam_jobs: list[_Job] = []  # jobs of the current beam level, committed
        self.level = 0
        self.width = 0
        self.finished: list[int] = []  # beam: finished answer nodes
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.execs = 0
        self.expansions = 0
        self.finalizing = False


class _Job:
    """One claimed leaf in flight: its request, then its candidate children."""

    __slots__ = ("tree", "ticket", "leaf", "leaf_eid", "depth", "path", "n", "kind", "cap",
                 "prompt_ids", "cands", "completions")

    def __init__(self, tree: _Tree, ticket: int, leaf: int, leaf_eid: int, depth: int,
                 path: list[int], n: int, kind: str, cap: int) -> None:
        self.tree = tree
        self.ticket = ticket
        self.leaf = leaf
        self.leaf_eid = leaf_eid
        self.depth = depth
        self.path = path
        self.n = n
        self.kind = kind  # "mcts" | "beam" | "chain"
        self.cap = cap  # deepest node this rollout may expand (official step budget)
        self.prompt_ids: list[int] = []
        self.cands: list[_Node] = []
        self.completions: list[Any] = []


@dataclass
class SearchResult:
    """The search of one problem: the chosen answer and the whole tree record (the JSON
    line of docs/design.md "Search output")."""

    id: str
    answer: str | None
    correct: bool | None
    record: dict[str, Any] = field(repr=False)


@dataclass
class SearchStats:
    """Run-wide counters (the progress bar and the benchmarks read them)."""

    problems: int = 0
    solved: int = 0
    nodes: int = 0
    tokens: int = 0
    execs: int = 0
    expansions: int = 0
    commits: int = 0
    loop_s: float = 0.0  # time the main loop spent in its own work (engine + bookkeeping)
    step_s: float = 0.0  # time spent parsing / building programs / candidates
    paused_s: float = 0.0  # async: time the loop waited between turns (turn intervals, busy generator)
    wall_s: float = 0.0


# --------------------------------------------------------------------------- output
class ResultWriter:
    """Append-only JSONL of finished problems, safe against kills at any moment.

    Each problem is one full line; the problems finished together are appended with one
    ``os.write`` on an ``O_APPEND`` descriptor, then one fsync. On open, a torn last line
    (a kill mid-write) is cut off, and the ids already present are skipped by the search."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict[str, Any]] = {}
        self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            line = data[pos:nl]
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            self.done[str(rec["id"])] = rec
            pos = nl + 1
            good = pos
        if good < len(data):
            logger.warning("%s: dropping a torn last record (%d bytes)", self.path, len(data) - good)
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())

    def write(self, record: dict[str, Any]) -> None:
        self.write_many([record])

    def write_many(self, records: Sequence[dict[str, Any]]) -> None:
        """Append ``records`` (one line each) with one ``os.write`` and one fsync: a kill
        leaves whole lines plus at most one torn last line, which ``_recover`` cuts."""
        if not records:
            return
        dumps = json.dumps
        data = "".join([dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records]).encode()
        n = os.write(self._fd, data)
        if n != len(data):  # pragma: no cover - regular files write fully
            raise OSError(f"short write to {self.path}")
        os.fsync(self._fd)
        for r in records:
            self.done[str(r["id"])] = r

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --------------------------------------------------------------------------- batching
class _Batcher:
    """Collects items submitted from many places and runs ``fn`` on them in its own worker
    thread, one batch at a time (whole submissions, up to ``max_batch`` items), so PPM
    scoring and grading overlap with generation.

    ``put(items, done)`` hands the results to ``done`` (called on the event loop with the
    list of results, or with the exception ``fn`` raised): no future and no task per
    submission. ``submit(items)`` is the awaitable form. What is submitted during one
    event-loop step (and while a batch runs) goes out together; the batch state lives on
    the event loop's thread, the worker only runs ``fn`` (one queue put there, one
    ``call_soon_threadsafe`` back per batch)."""

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 4096, name: str = "batch") -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.name = name
        self._queue: deque[tuple[list[Any], Callable[[Any], None]]] = deque()
        self._busy = False
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[Any] | None = None

    def put(self, items: list[Any], done: Callable[[Any], None]) -> None:
        self._queue.append((items, done))
        if not self._busy and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    async def submit(self, items: list[Any]) -> list[Any]:
        if not items:
            return []
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

        def done(res: Any) -> None:
            if fut.done():
                return
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

        self.put(items, done)
        return await fut

    def _dispatch(self) -> None:
        self._scheduled = False
        q = self._queue
        if self._busy or not q:
            return
        batch = [q.popleft()]
        total = len(batch[0][0])
        while q and total < self.max_batch:
            item = q.popleft()
            batch.append(item)
            total += len(item[0])
        flat = batch[0][0] if len(batch) == 1 else [x for items, _ in batch for x in items]
        if self._jobs is None:
            self._loop = asyncio.get_running_loop()
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(self._jobs, self._loop), name=f"rstar-search-{self.name}",
                             daemon=True).start()
        self._busy = True
        self._jobs.put((flat, batch))

    def _work(self, jobs: queue.SimpleQueue[Any], loop: asyncio.AbstractEventLoop) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            flat, batch = job
            try:
                out, exc = self.fn(flat), None
            except BaseException as e:  # noqa: BLE001 - handed to every submitter
                out, exc = None, e
            try:
                loop.call_soon_threadsafe(self._deliver, batch, out, exc)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _deliver(self, batch: list[tuple[list[Any], Callable[[Any], None]]], out: Any,
                 exc: BaseException | None) -> None:
        self._busy = False
        if exc is not None:
            for _, done in batch:
                done(exc)
        else:
            pos = 0
            for items, done in batch:
                done(out[pos : pos + len(items)])
                pos += len(items)
        if self._queue:
            self._dispatch()

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.put(None)
        self._jobs = None
        self._loop = None
        self._busy = False
        self._scheduled = False
        self._queue.clear()


class _Inbox:
    """What the async main loop waits for: finished jobs, finished records and errors,
    appended by callbacks on the loop (``put``) and by other threads (``put_threadsafe``:
    the sandbox's result thread); the loop takes them all at once (one waiter future per
    wait, not a queue operation per item).

    Another thread wakes the loop only while it waits in ``take`` with nothing to take,
    and once per wait: between turns (and while the loop paces its turns) items from
    other threads just queue up, so a batch of sandbox results costs one wake-up, or
    none."""

    __slots__ = ("items", "_waiter", "_remote", "_loop", "_waiting", "_signalled")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.items: list[tuple[str, Any]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._remote: deque[tuple[str, Any]] = deque()  # from other threads (append is atomic)
        self._loop = loop
        self._waiting = False  # the loop is (about to be) blocked in take()
        self._signalled = False  # a wake-up is on its way for this wait

    def put(self, item: tuple[str, Any]) -> None:
        self.items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def put_threadsafe(self, item: tuple[str, Any]) -> None:
        """``put`` from any thread. Append first, then look at ``_waiting`` (take() sets
        it before it looks at the queue): either take() sees the item or this call sees
        the loop waiting and wakes it. Dropped once the loop is closed."""
        self._remote.append(item)
        if self._waiting and not self._signalled:
            self._signalled = True
            try:
                self._loop.call_soon_threadsafe(self._wake)  # type: ignore[union-attr]
            except RuntimeError:  # the loop is closed: the search has already ended
                pass

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _drain(self) -> None:
        remote = self._remote
        while remote:
            self.items.append(remote.popleft())

    async def take(self) -> list[tuple[str, Any]]:
        self._drain()
        while not self.items:  # (a late wake-up of an earlier wait may find nothing)
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            self._signalled = False
            self._waiting = True
            try:
                self._drain()  # what arrived before _waiting was seen
                if not self.items:
                    await waiter
            finally:
                self._waiting = False
                self._waiter = None
            self._drain()
        items, self.items = self.items, []
        return items


@contextlib.contextmanager
def _gc_threshold(threshold0: int | None) -> Any:
    old = gc.get_threshold()
    if threshold0 is None or old[0] == 0 or old[0] >= threshold0:  # 0: automatic GC is off
        yield
        return
    gc.set_threshold(threshold0, *old[1:])
    try:
        yield
    finally:
        if gc.get_threshold()[0] == threshold0:  # unless someone changed it meanwhile
            gc.set_threshold(*old)


class _Countdown:
    """Calls ``fire`` once, when ``tick`` has been called ``n`` times, from whichever thread
    ticks last (``concurrent.futures`` callbacks run in the thread that sets the result)."""

    __slots__ = ("_left", "_lock", "_fire")

    def __init__(self, n: int, fire: Any) -> None:
        self._left = n
        self._lock = threading.Lock()
        self._fire = fire

    def tick(self, _: Any = None) -> None:
        with self._lock:
            self._left -= 1
            fire = None
            if self._left == 0:
                # dropped before the call: the futures' callback lists hold this countdown,
                # and ``fire`` holds the futures; the cycle would leave every job (its tree,
                # nodes and token lists) to the cyclic GC instead of reference counting
                fire, self._fire = self._fire, None
        if fire is not None:
            fire()


class _Pacer:
    """How long the async loop waits before its next turn, so that one turn handles what
    finished meanwhile.

    Always ``interval`` (``turn_interval_ms``). While the generator reports a backlog
    (``backlog()``: sequences queued behind its full batch), up to ``busy`` seconds: work
    held back then costs no throughput as long as the server still has queued work to run,
    so the pause is also capped at half the time its backlog lasts at the measured rate of
    finished sequences. A saturated server hands results back a few at a time; without the
    pause each turn handles about one job and pays its fixed costs alone."""

    __slots__ = ("interval", "busy", "backlog", "done", "rate", "_t", "_n")

    #: the finished-sequence rate is measured over windows at least this long (seconds)
    WINDOW_S = 0.05

    def __init__(self, interval: float, busy: float, backlog: Callable[[], int] | None) -> None:
        self.interval = interval
        self.backlog = backlog
        self.busy = busy if backlog is not None else 0.0
        self.done = 0  # sequences the generator finished (the caller counts them)
        self.rate = 0.0  # finished sequences per second (moving average)
        self._t: float | None = None
        self._n = 0

    def pause(self, now: float) -> float:
        """The least time between the last turn and the next one, seen at ``now``."""
        if self.busy <= 0.0:  # never paced on a backlog: no rate to keep
            return self.interval
        if self._t is None:
            self._t, self._n = now, self.done
        elif now - self._t >= self.WINDOW_S:
            seen = (self.done - self._n) / (now - self._t)
            self.rate = seen if self.rate == 0.0 else 0.75 * self.rate + 0.25 * seen
            self._t, self._n = now, self.done
        if self.rate <= 0.0:
            return self.interval
        queued = self.backlog()  # type: ignore[misc]
        if queued <= 0:
            return self.interval
        return max(self.interval, min(self.busy, 0.5 * queued / self.rate))


def _request_seed(base: int, pid: str, leaf: int, attempt: int) -> int:
    return _seed_of(f"{base}|{pid}|", leaf, attempt)


def _seed_of(prefix: str, leaf: int, attempt: int) -> int:
    """``_request_seed`` with ``f"{base}|{pid}|"`` formatted once per tree."""
    h = hashlib.blake2b(f"{prefix}{leaf}|{attempt}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------- searcher
class Searcher:
    """Searches many problems at once with one generator, scorer, sandbox and grader.

    ``generator`` implements ``rstar.backends.Generator`` (its ``tokenizer`` encodes
    prompts); ``scorer`` implements ``rstar.backends.Scorer`` (the PPM; required by the
    PPM-guided configs); ``sandbox`` defaults to ``rstar.sandbox.Sandbox(config.sandbox)``
    and ``grader`` to ``rstar.grading.Grader()`` (both closed by ``close`` only when created
    here).

    ``on_record``: called on the event loop with each problem's JSON record as soon as the
    problem finishes (after it is appended to ``out``), e.g. to stream data into a training
    loop; the attribute may be set between runs.

    ``gc_threshold``: while ``run`` / ``arun`` runs, CPython's generation-0 GC threshold is
    raised to at least this (and restored after). The search allocates many short-lived
    containers (requests and their token-id lists live for one generation latency); with
    the default threshold (700) the cyclic collector runs every few milliseconds and walks
    every in-flight token-id list each time, a large share of the search's CPU. ``None``
    leaves the collector alone."""

    gc_threshold: int | None = 100_000

    def __init__(
        self,
        generator: Any,
        scorer: Any = None,
        config: SearchConfig | None = None,
        *,
        sandbox: Any = None,
        grader: Any = None,
        forest: Any = None,
        on_record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = config or SearchConfig()
        self.on_record = on_record
        if self.cfg.needs_scorer and scorer is None:
            raise ValueError(
                f"mode={self.cfg.mode} value={self.cfg.value} vote={self.cfg.vote} needs a scorer (PPM)"
            )
        self.gen = generator
        self.tok = generator.tokenizer
        self.scorer = scorer
        self._own: list[Any] = []
        if sandbox is None:
            from rstar.sandbox import Sandbox, SandboxConfig

            sandbox = Sandbox(SandboxConfig(**self.cfg.sandbox))
            self._own.append(sandbox)
        self.sandbox = sandbox
        if grader is None:
            from rstar.grading import Grader

            grader = Grader()
            self._own.append(grader)
        self.grader = grader
        from rstar.backends import GenerationRequest, ScoreRequest

        self._GenReq = GenerationRequest
        self._ScoreReq = ScoreRequest
        if forest is None:
            from rstar.engine import core_available, make_forest

            use_ref = self.cfg.reference_engine or not core_available()
            if use_ref and not self.cfg.reference_engine:
                logger.warning("rstar._core is not built: using the pure-Python reference engine (slow)")
            forest = make_forest(self.cfg.engine, reference=use_ref)
        self.forest = forest
        self.stats = SearchStats()
        self._trees: dict[int, _Tree] = {}
        self._next_key = 0
        self._obs_cache: dict[str, list[int]] = {}
        self._exported: dict[int, tuple[list[int], list[float]]] = {}
        self._cfg_dict = to_dict(self.cfg)
        self._stops = tuple(self.cfg.generation.stop)
        self._inbox = _Inbox()
        self._pacer = _Pacer(0.0, 0.0, None)
        self._tasks: set[asyncio.Task[Any]] = set()
        # which valid children the PPM scores, per job kind: (non-terminal, terminal)
        ppm_q = self.cfg.value in ("ppm", "ppm_init")
        self._score_rule = {"mcts": (ppm_q, self.cfg.value == "ppm"), "beam": (True, True), "chain": (False, True)}
        # answer extraction (rstar.grading) is imported on first use by the step parser:
        # import it now, with the searcher, rather than inside the first expansion
        classify_step("\\boxed{0}", END_OF_ANSWER)

    # ------------------------------------------------------------------ public API
    def run(self, problems: Sequence[Any], out: str | Path | None = None, *,
            progress: bool = True) -> list[SearchResult]:
        """Search ``problems``; with ``out``, append one JSON line per finished problem and
        skip problems already there (resume). Results come back in problem order."""
        return asyncio.run(self.arun(problems, out, progress=progress))

    async def arun(self, problems: Sequence[Any], out: str | Path | None = None, *,
                   progress: bool = True) -> list[SearchResult]:
        writer = ResultWriter(out) if out is not None else None
        results: dict[str, SearchResult] = {}
        ids = [str(p.id) for p in problems]
        if len(set(ids)) != len(ids):
            raise ValueError("problem ids must be unique (problems are keyed by id, never by question)")
        todo = []
        for i, p in enumerate(problems):
            if writer is not None and str(p.id) in writer.done:
                rec = writer.done[str(p.id)]
                results[str(p.id)] = _result_of(rec)
            else:
                todo.append((i, p))
        if writer is not None and len(todo) < len(problems):
            logger.info("resuming: %d of %d problems already done", len(problems) - len(todo), len(problems))
        bar = _Progress(len(problems), len(problems) - len(todo), self.stats, enabled=progress)
        self._grade_b = _Batcher(self._grade_fn, name="grade")
        self._score_b = _Batcher(self._score_fn, max_batch=1024, name="score")
        t0 = time.perf_counter()
        try:
            with _gc_threshold(self.gc_threshold):
                if self.cfg.pipeline == "async":
                    await self._run_async(todo, writer, results, bar)
                else:
                    await self._run_lockstep(todo, writer, results, bar)
        finally:
            self._grade_b.close()
            self._score_b.close()
            bar.close()
            if writer is not None:
                writer.close()
            self.stats.wall_s += time.perf_counter() - t0
        return [results[i] for i in ids]

    def close(self) -> None:
        for obj in self._own:
            obj.close()
        self._own.clear()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ trees
    def _new_trees(self, items: list[tuple[int, Any]]) -> list[_Tree]:
        trees = []
        for index, p in items:
            text = build_prompt(p.question, "", self.cfg.prompt, tokenizer=self.tok)
            key = self._next_key
            self._next_key += 1
            t = _Tree(key, index, p, encode_prompt(self.tok, text))
            t.seed_prefix = f"{self.cfg.seed}|{t.pid}|"
            trees.append(t)
        if trees:
            tids = self.forest.add_trees(np.array([t.key << 32 for t in trees], dtype=np.uint64))
            roots = self.forest.roots(tids).tolist()
            for t, tid, root in zip(trees, tids.tolist(), roots):
                t.tid = tid
                t.nodes[0].eid = root
                self._trees[t.key] = t
        return trees

    def _start(self, trees: Iterable[_Tree], *, allow_rollouts: bool = True) -> list[_Job]:
        """Claim new leaves: the root of a fresh tree, or a new MCTS rollout from the root."""
        mode = self.cfg.mode
        cand = []
        for t in trees:
            if t.closed or t.finalizing:
                continue
            if mode == "mcts":
                if allow_rollouts and t.started < self.cfg.rollouts and t.in_flight < self.cfg.leaves_per_tree:
                    cand.append(t)
            elif not t.root_expanded and t.in_flight == 0 and t.expansions == 0:
                cand.append(t)
        jobs: list[_Job] = []
        while cand:
            sel = self.forest.select(np.array([t.tid for t in cand], dtype=np.uint32))
            got = self._jobs_from_selection(sel, by_tree={t.tid: t for t in cand})
            got_tid = {j.tree.tid for j in got}
            nxt = []
            missing = [t for t in cand if t.tid not in got_tid]
            if missing:
                roots_terminal = self.forest.node_stats(
                    np.array([t.nodes[0].eid for t in missing], dtype=np.uint32))["terminal"]
                for t, term in zip(missing, roots_terminal.tolist()):
                    if term:
                        t.closed = True
                    elif t.in_flight == 0 and mode == "mcts":
                        t.started += 1  # a dead end below the root consumes the rollout (official)
                        if t.started < self.cfg.rollouts:
                            nxt.append(t)
            for j in got:
                t = j.tree
                t.in_flight += 1
                if mode == "mcts":
                    t.started += 1
                    j.cap = self.cfg.max_depth if (t.root_expanded or not self.cfg.official_step_budget) \
                        else self.cfg.max_depth - 1
                    if t.started < self.cfg.rollouts and t.in_flight < self.cfg.leaves_per_tree:
                        nxt.append(t)
                elif mode == "beam":
                    t.width = self.cfg.beam_width
                jobs.append(j)
            cand = nxt
        return jobs

    def _jobs_from_selection(self, sel: Any, *, by_tree: dict[int, _Tree] | None = None,
                             kind: str | None = None, cap: int | None = None) -> list[_Job]:
        """One job per returned leaf (paths -> local ids -> prompt token ids)."""
        jobs = []
        if len(sel) == 0:
            return jobs
        offs = sel.path_offsets.tolist()
        pay = sel.path_payloads.tolist()
        tickets = sel.tickets.tolist()
        nodes = sel.nodes.tolist()
        depths = sel.depths.tolist()
        mode = self.cfg.mode
        kind = kind or {"mcts": "mcts", "beam": "beam"}.get(mode, "chain")
        for i in range(len(tickets)):
            path_pay = pay[offs[i] : offs[i + 1]]
            tree = self._trees[path_pay[0] >> 32]
            path = [p & _LOCAL_MASK for p in path_pay]
            if kind == "mcts":
                n = self.cfg.n
            elif kind == "beam":
                n = self.cfg.n
            else:
                n = (1 if mode == "greedy" else self.cfg.n) if len(path) == 1 else 1
            jobs.append(_Job(tree, tickets[i], path[-1], nodes[i], depths[i], path, n, kind,
                             self.cfg.max_depth if cap is None else cap))
        return jobs

    # ------------------------------------------------------------------ step logic
    def _request(self, job: _Job) -> Any:
        """The generation request of a job: the prompt is the tree's prompt ids followed by
        the stored ids of every node on the engine's path (no text is re-tokenized)."""
        t = job.tree
        ids = job.prompt_ids  # set by _continue when the leaf's PPM request built it already
        if not ids:
            nodes = t.nodes
            ids = t.prompt_ids.copy()
            path = job.path
            for k in range(1, len(path)):
                ids += nodes[path[k]].ids
            job.prompt_ids = ids
        g = self.cfg.generation
        return self._GenReq(prompt_ids=ids, n=job.n, temperature=g.temperature, top_p=g.top_p,
                            max_new_tokens=g.max_new_tokens, stop=self._stops,
                            seed=_seed_of(t.seed_prefix, job.leaf, t.expansions))

    def _block_code(self, job: _Job) -> str:
        """The code of the current block on the job's path (``steps.block_code`` of the path
        texts), shared by the job's candidates' programs. Each node's part is worked out
        once, the first time a path through it needs it (its text and execution status
        are final by then): False when its text closes a block, "" when it is skipped
        (``skip_failed_code``), else the step's code."""
        nodes = job.tree.nodes
        mode = self.cfg.skip_failed_code
        parts = []
        i = job.leaf
        while i > 0:
            n = nodes[i]
            bc = n.bcode
            if bc is None:
                if closes_block(n.text):
                    bc = False
                elif (mode == "timeout" and n.timed_out) or (mode == "all" and n.exec_ok is False):
                    bc = ""
                else:
                    bc = n.code if n.code else step_code(n.text)
                n.bcode = bc
            if bc is False:
                break
            if bc:
                parts.append(bc)
            i = n.parent
        if not parts:
            return ""
        if len(parts) == 1:
            return parts[0]  # type: ignore[return-value]
        parts.reverse()
        return "".join(parts)  # type: ignore[arg-type]

    def _candidates(self, job: _Job, completions: Sequence[Any]) -> list[tuple[_Node, str]]:
        """Parse, dedup and collapse the completions; returns (node, program) for code steps."""
        t0 = time.perf_counter()
        cfg = self.cfg
        tree = job.tree
        ntok = 0
        answer_stop = None
        for c in completions:
            ntok += len(c.token_ids)
            if answer_stop is None and c.stop == END_OF_ANSWER:
                answer_stop = c
        tree.tokens += ntok
        self.stats.tokens += ntok
        comps = [answer_stop] if answer_stop is not None and cfg.answer_collapse else completions
        seen: set[str] | None = set() if cfg.dedup else None
        depth = job.depth + 1
        too_deep = depth > cfg.max_depth
        leaf = job.leaf
        parent_errors = tree.nodes[leaf].errors
        rollout = tree.started
        block: str | None = None
        programs: list[tuple[_Node, str]] = []
        cands = []
        for c in comps:
            text = c.text
            if seen is not None:
                if text in seen:
                    continue
                seen.add(text)
            kind, closes, answer = classify_step(text, c.stop)
            node = _Node(leaf, depth, text, list(c.token_ids), _KIND_NAME[kind], parent_errors, rollout)
            cands.append(node)
            if too_deep:
                node.invalidate("depth")
            elif kind is _CODE:
                node.closes = closes
                if block is None:
                    block = self._block_code(job)
                node.code = code = step_code(text)
                programs.append((node, normalise_program(block + code)))
            elif kind is _ANSWER:
                node.terminal = True
                node.answer = answer
                if answer is None:
                    node.invalidate("no_answer")
            else:
                node.invalidate("truncated")
        job.cands = cands
        self.stats.step_s += time.perf_counter() - t0
        return programs

    def _apply_exec(self, job: _Job, node: _Node, result: Any) -> None:
        ok = bool(result.ok)
        node.exec_ok = ok
        status = getattr(result, "status", None)
        if status is None or type(status) is str:
            node.exec_status = status
        else:
            value = getattr(status, "value", _MISSING)
            node.exec_status = str(status) if value is _MISSING else value
        node.timed_out = node.exec_status == "timeout"
        node.errors = next_error_count(job.tree.nodes[job.leaf].errors, ok)
        job.tree.execs += 1
        self.stats.execs += 1
        if node.closes or node.errors >= self.cfg.error_threshold:
            obs = observation_text(result.observation)
            node.text += obs
            ids = self._obs_cache.get(obs)
            if ids is None:
                ids = encode_continuation(self.tok, obs)
                if len(self._obs_cache) < 100_000:
                    self._obs_cache[obs] = ids
            node.ids = node.ids + ids
        if node.errors >= self.cfg.error_threshold:
            node.invalidate("errors")

    async def _execute(self, programs: list[str], *, batch: bool = False) -> list[Any]:
        """Run ``programs`` concurrently and return their results in order.

        With ``batch`` (lock-step: every program of the step at once) and a sandbox with
        ``run_many`` (``rstar.sandbox.Sandbox`` has it), one call in a worker thread.
        Otherwise every ``arun`` gets a task; all are started before any is awaited. (The
        async pipeline never blocks a worker thread per job: the default executor has few
        threads.)"""
        if batch and len(programs) > 1:
            run_many = getattr(self.sandbox, "run_many", None)
            if run_many is not None:
                return list(await asyncio.to_thread(run_many, programs))
        arun = self.sandbox.arun
        out: list[Any] = []
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[Any]] = []
        try:
            for p in programs:
                tasks.append(loop.create_task(arun(p)))
            for task in tasks:
                out.append(await task)
        except BaseException:
            for task in tasks:
                if not task.cancel() and not task.cancelled():
                    task.exception()  # retrieved: no "never retrieved" warning
            raise
        return out

    def _needs_grade_now(self, job: _Job) -> bool:
        return job.kind == "mcts" and self.cfg.value in ("terminal", "ppm_init")

    def _grade_targets(self, job: _Job) -> list[_Node]:
        if not self._needs_grade_now(job):
            return []
        return [c for c in job.cands if c.valid and c.terminal and c.answer is not None]

    def _to_score(self, job: _Job) -> list[_Node]:
        """The children the PPM scores: valid ones; mcts: non-terminal ones with ``ppm`` /
        ``ppm_init`` values, terminal ones with ``ppm``; beam: all; chains: the answer step
        (best-of-N by PPM)."""
        if self.scorer is None:
            return []
        nonterminal, terminal = self._score_rule[job.kind]
        return [c for c in job.cands if c.valid and (terminal if c.terminal else nonterminal)]

    def _score_request(self, job: _Job, node: _Node) -> Any:
        node.full = ids = job.prompt_ids + node.ids
        return self._ScoreReq(prompt_ids=ids)

    def _grade_fn(self, pairs: list[tuple[str, str]]) -> list[bool]:
        return list(self.grader.grade_many([p for p, _ in pairs], [g for _, g in pairs]))

    def _score_fn(self, reqs: list[Any]) -> list[float]:
        return [float(v) for v in self.scorer.score(reqs)]

    def _grading_work(self, jobs: list[_Job]) -> tuple[list[_Node], list[tuple[str, str]], list[_Job], list[_Job]]:
        """The children to grade, their (answer, gold) pairs, the jobs that have some, the rest."""
        targets: list[_Node] = []
        pairs: list[tuple[str, str]] = []
        graded: list[_Job] = []
        rest: list[_Job] = []
        for j in jobs:
            found = self._grade_targets(j)
            if found:
                gold = str(j.tree.problem.answer)
                targets += found
                pairs += [(c.answer, gold) for c in found]
                graded.append(j)
            else:
                rest.append(j)
        return targets, pairs, graded, rest

    async def _post_batch(self, jobs: list[_Job]) -> None:
        """Grade (when values need it) and PPM-score the children of many jobs: one
        grading submission, then the scoring requests in batches of ``max_batch``."""
        targets, pairs, _, _ = self._grading_work(jobs)
        if pairs:
            res = await self._grade_b.submit(pairs)
            for c, ok in zip(targets, res):
                c.correct = bool(ok)
        scored: list[_Node] = []
        reqs: list[Any] = []
        for j in jobs:
            for c in self._to_score(j):
                scored.append(c)
                reqs.append(self._score_request(j, c))
        if reqs:
            step = self._score_b.max_batch
            vals: list[Any] = []
            for i in range(0, len(reqs), step):
                vals += await self._score_b.submit(reqs[i : i + step])
            for c, v in zip(scored, vals):
                c.ppm = float(v)

    # async pipeline ------------------------------------------------------------------
    # While a job's request is out: its generator future and a done callback
    # (``Generator.submit``), else one task (``agenerate``). What follows runs on
    # the main loop over everything that arrived together: parsing, the code (sandbox
    # futures with one countdown per job, or ``arun`` tasks), then
    # grading / PPM scoring through the batchers (one submission per group of jobs), then
    # one commit.
    async def _gen_task(self, job: _Job, req: Any) -> None:
        try:
            comps = await self.gen.agenerate(req)
            self._pacer.done += job.n
            self._inbox.put(("gen", (job, comps)))
        except BaseException as exc:  # the main loop re-raises
            self._inbox.put(("error", exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]

    def _run_generated(self, gens: list[tuple[_Job, Any]]) -> list[_Job]:
        """Parse the completions and run the code of each job; returns the jobs whose code
        has finished (the others come back through the inbox as ``"exec"`` or
        ``"exec_futures"``).

        A sandbox with ``submit_many`` or ``submit`` (``rstar.sandbox.Sandbox``: a
        ``concurrent.futures`` future per program, already done on a cache hit) costs no
        coroutine or task: a job's programs go in one call, their futures share one
        countdown, and the last to finish wakes the loop once for the whole job. Otherwise
        every ``arun`` gets a task, and a job waits for its tasks in one more."""
        submit_many = getattr(self.sandbox, "submit_many", None)
        if submit_many is None:
            submit = getattr(self.sandbox, "submit", None)
            if submit is not None:
                submit_many = functools.partial(map, submit)
        if submit_many is not None:
            return self._submit_generated(gens, submit_many)
        done = []
        arun = self.sandbox.arun
        for job, comps in gens:
            programs = self._candidates(job, comps)
            if not programs:
                done.append(job)
                continue
            loop = asyncio.get_running_loop()
            waiting: list[tuple[_Node, asyncio.Task[Any]]] = []
            try:
                for node, program in programs:
                    waiting.append((node, loop.create_task(arun(program))))
            except BaseException:
                for _, task in waiting:
                    task.cancel()
                raise
            self._tasks.add(loop.create_task(self._exec_task(job, waiting)))
        return done

    def _submit_generated(self, gens: list[tuple[_Job, Any]], submit_many: Any) -> list[_Job]:
        done = []
        put = self._inbox.put_threadsafe
        for job, comps in gens:
            candidates = self._candidates(job, comps)
            futures = list(zip([node for node, _ in candidates],
                               submit_many([program for _, program in candidates])))
            running = [f for _, f in futures if not f.done()]
            if not running:
                self._apply_futures(job, futures)
                done.append(job)
                continue
            countdown = _Countdown(len(running), functools.partial(put, ("exec_futures", (job, futures))))
            for f in running:
                f.add_done_callback(countdown.tick)
        return done

    def _apply_futures(self, job: _Job, futures: list[tuple[_Node, Any]]) -> None:
        """Apply finished sandbox futures in candidate order (a failed one raises here, in
        the main loop, as a failed ``arun`` task does)."""
        for node, f in futures:
            self._apply_exec(job, node, f.result())

    async def _exec_task(self, job: _Job, waiting: list[tuple[_Node, asyncio.Task[Any]]]) -> None:
        try:
            for node, task in waiting:
                self._apply_exec(job, node, await task)
            self._inbox.put(("exec", job))
        except BaseException as exc:
            for _, task in waiting:
                if not task.cancel() and not task.cancelled():
                    task.exception()  # retrieved: no "never retrieved" warning
            self._inbox.put(("error", exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]

    def _post(self, jobs: list[_Job]) -> list[_Job]:
        """Grade (when values need it), then PPM-score the children of ``jobs`` through the
        batchers; returns the jobs that need neither (the others come back as
        ``"scored"`` when their values are in)."""
        if self.cfg.mode == "mcts" and self.cfg.value in ("terminal", "ppm_init"):
            targets, pairs, graded, rest = self._grading_work(jobs)
            if graded:
                def on_graded(res: Any) -> None:
                    try:
                        if isinstance(res, BaseException):
                            raise res
                        for c, ok in zip(targets, res):
                            c.correct = bool(ok)
                        now = self._score(graded)
                        if now:
                            self._inbox.put(("scored", now))
                    except Exception as exc:  # noqa: BLE001 - handed to the main loop
                        self._inbox.put(("error", exc))

                self._grade_b.put(pairs, on_graded)
                jobs = rest
        return self._score(jobs)

    def _score(self, jobs: list[_Job]) -> list[_Job]:
        """Submit the PPM requests of ``jobs`` (groups of at most ``max_batch`` requests, one
        submission each); returns the jobs with nothing to score."""
        now: list[_Job] = []
        if self.scorer is None:
            return jobs
        limit = self._score_b.max_batch
        group: list[_Job] = []
        nodes: list[_Node] = []
        reqs: list[Any] = []
        ScoreReq = self._ScoreReq
        for j in jobs:
            scored = self._to_score(j)
            if not scored:
                now.append(j)
                continue
            if reqs and len(reqs) + len(scored) > limit:
                self._submit_scores(group, nodes, reqs)
                group, nodes, reqs = [], [], []
            group.append(j)
            nodes += scored
            prompt = j.prompt_ids
            for c in scored:
                c.full = ids = prompt + c.ids
                reqs.append(ScoreReq(prompt_ids=ids))
        if reqs:
            self._submit_scores(group, nodes, reqs)
        return now

    def _submit_scores(self, group: list[_Job], nodes: list[_Node], reqs: list[Any]) -> None:
        def done(vals: Any) -> None:
            try:
                if isinstance(vals, BaseException):
                    raise vals
                for c, v in zip(nodes, vals):
                    c.ppm = float(v)
            except Exception as exc:  # noqa: BLE001 - handed to the main loop
                self._inbox.put(("error", exc))
                return
            self._inbox.put(("scored", group))

        self._score_b.put(reqs, done)

    async def _run_async(self, todo: list[tuple[int, Any]], writer: ResultWriter | None,
                         results: dict[str, SearchResult], bar: _Progress) -> None:
        loop = asyncio.get_running_loop()
        inbox = self._inbox = _Inbox(loop)
        tasks = self._tasks = set()
        pending = list(reversed(todo))
        inflight = 0  # jobs launched and not committed + batches of finished trees being recorded

        submit = getattr(self.gen, "submit", None)
        waiting: set[asyncio.Future[Any]] = set()  # generator futures not yet done
        pacer = self._pacer = _Pacer(self.cfg.turn_interval_ms / 1000.0, self.cfg.busy_turn_interval_ms / 1000.0,
                                     getattr(self.gen, "backlog", None))

        def generated(job: _Job, fut: asyncio.Future[Any]) -> None:
            waiting.discard(fut)
            if fut.cancelled():  # by the generator (a shutdown): the search cannot go on
                inbox.put(("error", asyncio.CancelledError("a generation request was cancelled")))
                return
            exc = fut.exception()
            if exc is not None:
                inbox.put(("error", exc))
                return
            pacer.done += job.n
            inbox.put(("gen", (job, fut.result())))

        def launch(jobs: list[_Job]) -> None:
            nonlocal inflight
            for j in jobs:
                if submit is not None:  # a future per request, no task (Generator.submit)
                    fut = submit(self._request(j))
                    waiting.add(fut)
                    fut.add_done_callback(functools.partial(generated, j))
                else:
                    tasks.add(loop.create_task(self._gen_task(j, self._request(j))))
            inflight += len(jobs)

        def admit() -> list[_Tree]:
            take = []
            while pending and len(self._trees) + len(take) < self.cfg.concurrent_trees:
                take.append(pending.pop())
            return self._new_trees(take)

        last_turn = -math.inf
        try:
            t0 = time.perf_counter()
            launch(self._start(admit()))
            self.stats.loop_s += time.perf_counter() - t0
            while self._trees or pending or inflight:
                if inflight == 0:
                    # nothing in flight: start whatever can start, finish whatever is done
                    t0 = time.perf_counter()
                    launch(self._start(list(self._trees.values()) + admit()))
                    self.stats.loop_s += time.perf_counter() - t0
                    if inflight == 0:
                        done = await self._finish_all(writer, results, bar)
                        if not done and not pending:
                            if self._trees:
                                raise RuntimeError("search stalled with unfinished trees")
                            break
                        continue
                pause = pacer.pause(loop.time())
                if pause > 0:
                    wait = last_turn + pause - loop.time()
                    if wait > 0:
                        self.stats.paused_s += wait
                        await asyncio.sleep(wait)  # let more work finish: one turn handles it all
                batch = await inbox.take()
                last_turn = loop.time()
                t0 = time.perf_counter()
                jobs: list[_Job] = []
                gens: list[tuple[_Job, Any]] = []
                executed: list[_Job] = []
                finals: list[tuple[_Tree, dict[str, Any]]] = []
                for kind, payload in batch:
                    if kind == "gen":
                        gens.append(payload)
                    elif kind == "scored":
                        jobs += payload
                    elif kind == "exec":
                        executed.append(payload)
                    elif kind == "exec_futures":
                        self._apply_futures(*payload)
                        executed.append(payload[0])
                    elif kind == "final":
                        inflight -= 1
                        finals += payload
                    else:
                        raise payload
                if finals:
                    self._write_all(finals, writer, results, bar)
                if gens:
                    executed += self._run_generated(gens)
                if executed:
                    jobs += self._post(executed)
                if jobs:
                    inflight -= len(jobs)
                    touched = self._commit(jobs)
                    new_jobs = self._continue(jobs)
                    new_jobs += self._start(touched + admit())
                    launch(new_jobs)
                    done_trees = [t for t in touched
                                  if t.key in self._trees and not t.finalizing and self._tree_done(t)]
                    if done_trees:
                        for t in done_trees:
                            t.finalizing = True
                        self._release(done_trees)
                        inflight += 1
                        tasks.add(loop.create_task(self._final_task(done_trees)))
                self.stats.loop_s += time.perf_counter() - t0
                bar.refresh()
        finally:
            for task in list(tasks):
                task.cancel()
            for fut in list(waiting):
                fut.cancel()

    async def _final_task(self, trees: list[_Tree]) -> None:
        try:
            recs = await self._records(trees)
            self._inbox.put(("final", list(zip(trees, recs))))
        except BaseException as exc:
            self._inbox.put(("error", exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _finish_all(self, writer: ResultWriter | None, results: dict[str, SearchResult],
                          bar: _Progress) -> bool:
        """Finalize every tree that is done; returns whether any was."""
        done = [t for t in self._trees.values() if not t.finalizing and self._tree_done(t)]
        if not done:
            return False
        for t in done:
            t.finalizing = True
        self._release(done)
        recs = await self._records(done)
        self._write_all(list(zip(done, recs)), writer, results, bar)
        return True

    # lock-step pipeline ------------------------------------------------------------
    async def _run_lockstep(self, todo: list[tuple[int, Any]], writer: ResultWriter | None,
                            results: dict[str, SearchResult], bar: _Progress) -> None:
        pending = list(reversed(todo))
        jobs: list[_Job] = []
        while self._trees or pending or jobs:
            t0 = time.perf_counter()
            if not jobs:
                # barrier: every tree idle -> finish, admit, start the next rollout together
                self.stats.loop_s += time.perf_counter() - t0
                await self._finish_all(writer, results, bar)
                t0 = time.perf_counter()
                take = []
                while pending and len(self._trees) + len(take) < self.cfg.concurrent_trees:
                    take.append(pending.pop())
                self._new_trees(take)
                jobs = self._start(sorted(self._trees.values(), key=lambda t: t.key))
                if not jobs:
                    self.stats.loop_s += time.perf_counter() - t0
                    if not await self._finish_all(writer, results, bar) and not pending:
                        if self._trees:
                            raise RuntimeError("lock-step search stalled with unfinished trees")
                        break
                    continue
            reqs = [self._request(j) for j in jobs]
            self.stats.loop_s += time.perf_counter() - t0
            outs = await asyncio.to_thread(self.gen.generate, reqs)
            programs: list[tuple[_Job, _Node, str]] = []
            for j, comps in zip(jobs, outs):
                programs.extend((j, node, p) for node, p in self._candidates(j, comps))
            if programs:
                res = await self._execute([p for _, _, p in programs], batch=True)
                for (j, node, _), r in zip(programs, res):
                    self._apply_exec(j, node, r)
            await self._post_batch(jobs)
            t0 = time.perf_counter()
            self._commit(jobs)
            jobs = self._continue(jobs)
            self.stats.loop_s += time.perf_counter() - t0
            bar.refresh()

    # ------------------------------------------------------------------ commit
    def _commit(self, jobs: list[_Job]) -> list[_Tree]:
        """Write finished expansions into the engine: one expand, one set_values, one
        backup_nodes, one mark_invalid and one cancel for the whole batch."""
        cfg = self.cfg
        f = self.forest
        value_ppm = cfg.value == "ppm"
        pos_r, neg_r = cfg.positive_reward, cfg.negative_reward
        payloads: list[int] = []
        allc: list[_Node] = []
        touched = {}
        for j in jobs:
            t = j.tree
            nodes = t.nodes
            cands = j.cands
            if j.kind == "mcts":
                for c in cands:
                    if c.terminal and c.valid:
                        if value_ppm:
                            c.reward = c.ppm if c.ppm is not None else 0.0
                        else:
                            c.reward = pos_r if c.correct else neg_r
            base = len(nodes)
            for local, c in enumerate(cands, base):
                c.local = local
            key = (t.key << 32) + base
            payloads += range(key, key + len(cands))
            nodes += cands
            allc += cands
            t.expansions += 1
            if j.leaf == 0:
                t.root_expanded = True
            t.in_flight -= 1
            touched[t.key] = t
        self.stats.expansions += len(jobs)
        self.stats.commits += 1
        self.stats.nodes += len(allc)
        tickets = np.array([j.ticket for j in jobs], dtype=np.uint64)
        first = f.expand(
            tickets, np.array([len(j.cands) for j in jobs], dtype=np.uint32),
            payloads=np.array(payloads, dtype=np.uint64),
            terminal=np.array([c.terminal for c in allc], dtype=bool),
            rewards=np.array([0.0 if c.reward is None else c.reward for c in allc], dtype=np.float64),
        ).tolist()
        eids: list[int] = []
        for j, eid in zip(jobs, first):
            eids += range(eid, eid + len(j.cands))
        for c, eid in zip(allc, eids):
            c.eid = eid
        inv_n = [c.eid for c in allc if not c.valid]
        if cfg.mode == "mcts":  # terminal: backed up; non-terminal: PPM initialisation
            back = [c for c in allc if c.valid and c.terminal]
            init = [c for c in allc if c.valid and not c.terminal and c.ppm is not None]
        else:  # beam / chains: Q = PPM value of the step
            back = []
            init = [c for c in allc if c.valid and c.ppm is not None]
        if init:
            f.set_values(np.array([c.eid for c in init], dtype=np.uint32),
                         np.array([c.ppm for c in init], dtype=np.float64))
        if back:
            f.backup_nodes(np.array([c.eid for c in back], dtype=np.uint32),
                           np.array([c.reward for c in back], dtype=np.float64))
        if inv_n:
            f.mark_invalid(np.array(inv_n, dtype=np.uint32), cfg.invalid_value)
        f.cancel(tickets)
        return list(touched.values())

    def _continue(self, jobs: list[_Job]) -> list[_Job]:
        """Next leaves after a commit: MCTS rollouts descend into the best new child,
        beams move to the next level, chains continue their non-terminal children."""
        out: list[_Job] = []
        mcts = [j for j in jobs if j.kind == "mcts"]
        if mcts:
            sel = self.forest.select_from(np.array([j.leaf_eid for j in mcts], dtype=np.uint32))
            by_parent = {j.leaf_eid: j for j in mcts}
            new = self._jobs_from_selection(sel, kind="mcts")
            offs = sel.path_offsets.tolist()
            pnodes = sel.path_nodes.tolist()
            drop = []
            for i, nj in enumerate(new):
                parent_eid = pnodes[offs[i + 1] - 2]
                src = by_parent[parent_eid]
                nj.cap = src.cap
                if nj.depth > src.cap:  # the official step loop ends this rollout here
                    drop.append(nj.ticket)
                    continue
                nj.tree.in_flight += 1
                out.append(nj)
            if drop:
                self.forest.cancel(np.array(drop, dtype=np.uint64))
        beam_trees: dict[int, _Tree] = {}
        chain_starts: list[int] = []
        for j in jobs:
            if j.kind == "beam":
                j.tree.beam_jobs.append(j)
                if j.tree.in_flight == 0:
                    beam_trees[j.tree.key] = j.tree
            elif j.kind == "chain":
                chain_starts.extend(c.eid for c in j.cands if not c.terminal)
        starts: list[int] = []
        for t in beam_trees.values():
            starts.extend(self._next_beam(t))
        if starts:
            sel = self.forest.select_from(np.array(starts, dtype=np.uint32))
            for nj in self._jobs_from_selection(sel, kind="beam"):
                nj.tree.in_flight += 1
                out.append(nj)
        if chain_starts:
            sel = self.forest.select_from(np.array(chain_starts, dtype=np.uint32))
            for nj in self._jobs_from_selection(sel, kind="chain"):
                nj.tree.in_flight += 1
                out.append(nj)
        for nj in out:  # a new leaf scored in this step: its PPM request built its prompt
            full = nj.tree.nodes[nj.leaf].full
            if full is not None:
                nj.prompt_ids = full
        for j in jobs:  # the children's prompt lists are not kept beyond this step
            for c in j.cands:
                c.full = None
        return out

    def _next_beam(self, t: _Tree) -> list[int]:
        """Step beam search: rank the level's children by PPM; valid answers leave the beam
        (each shrinks it by one); the best non-terminal ones form the next beam. Children
        stay attached to the parent that generated them (the engine ticket)."""
        cands: list[tuple[float, int, _Node]] = []
        order = 0
        for j in t.beam_jobs:
            for c in j.cands:
                cands.append((c.ppm if c.ppm is not None else float("-inf"), order, c))
                order += 1
        t.beam_jobs = []
        cands.sort(key=lambda x: (-x[0], x[1]))
        for _, _, c in cands:
            if c.terminal and c.valid:
                t.finished.append(c.local)
                t.width -= 1
        t.level += 1
        if t.width <= 0:
            t.closed = True
            return []
        nxt = [c.eid for _, _, c in cands if not c.terminal][: t.width]
        if not nxt:
            t.closed = True
        return nxt

    def _tree_done(self, t: _Tree) -> bool:
        if t.in_flight:
            return False
        if self.cfg.mode == "mcts":
            return t.closed or t.started >= self.cfg.rollouts
        if self.cfg.mode == "beam":
            return t.closed or (t.root_expanded and not t.beam_jobs)
        return t.root_expanded or t.closed

    # ------------------------------------------------------------------ output
    def _release(self, trees: list[_Tree]) -> None:
        """Read the trees' statistics from the engine (one ``node_stats`` call over all
        their nodes), then free their nodes (one ``release_trees``)."""
        eids = [c.eid for t in trees for c in t.nodes]
        st = self.forest.node_stats(np.array(eids, dtype=np.uint32))
        visits = st["visits"].tolist()
        q = st["q"].tolist()
        pos = 0
        for t in trees:
            n = len(t.nodes)
            self._exported[t.key] = (visits[pos : pos + n], q[pos : pos + n])
            pos += n
        self.forest.release_trees(np.array([t.tid for t in trees], dtype=np.uint32))
        for t in trees:
            del self._trees[t.key]

    async def _records(self, trees: list[_Tree]) -> list[dict[str, Any]]:
        """The output records of released trees; the answers not graded yet are graded
        first, all in one submission."""
        if self.cfg.grade_answers:
            todo: list[_Node] = []
            pairs: list[tuple[str, str]] = []
            for t in trees:
                gold = str(t.problem.answer)
                if not gold:
                    continue
                for c in t.nodes:
                    if c.terminal and c.valid and c.answer is not None and c.correct is None:
                        todo.append(c)
                        pairs.append((c.answer, gold))
            if pairs:
                res = await self._grade_b.submit(pairs)
                for c, ok in zip(todo, res):
                    c.correct = bool(ok)
        return [self._record(t) for t in trees]

    def _record(self, t: _Tree) -> dict[str, Any]:
        cfg = self.cfg
        visits, q = self._exported.pop(t.key)
        nodes = [
            {"id": i, "parent": c.parent, "depth": c.depth, "text": c.text, "visits": v, "q": qi, "value": c.ppm,
             "reward": c.reward, "terminal": c.terminal, "valid": c.valid, "reason": c.reason, "kind": c.kind,
             "answer": c.answer, "correct": c.correct, "exec_ok": c.exec_ok, "exec_status": c.exec_status,
             "errors": c.errors, "rollout": c.rollout}
            for i, c, v, qi in zip(range(len(visits)), t.nodes, visits, q)
        ]
        mcts = cfg.mode == "mcts"
        answers = [
            {"node": i, "answer": c.answer, "value": q[i] if mcts else c.ppm, "ppm": c.ppm, "correct": c.correct}
            for i, c in enumerate(t.nodes) if c.terminal and c.valid and c.answer is not None
        ]
        chosen = self._choose(t, answers)
        return {
            "id": t.pid, "question": t.problem.question, "answer": str(t.problem.answer),
            "source": getattr(t.problem, "source", ""), "mode": cfg.mode, "config": self._cfg_dict,
            "nodes": nodes, "answers": answers, "chosen": chosen,
            "stats": {"nodes": len(t.nodes), "tokens": t.tokens, "execs": t.execs,
                      "expansions": t.expansions, "rollouts": t.started,
                      "seconds": round(time.perf_counter() - t.t0, 4)},
        }

    def _choose(self, t: _Tree, answers: list[dict[str, Any]]) -> dict[str, Any]:
        none = {"answer": None, "node": None, "correct": None}
        if not answers:
            return none
        cfg = self.cfg
        if cfg.mode == "best_of_n" and cfg.vote in ("majority", "weighted"):
            from rstar.metrics import majority_vote

            ans = [a["answer"] for a in answers]
            weights = None
            if cfg.vote == "weighted":
                weights = [a["ppm"] if a["ppm"] is not None else 0.0 for a in answers]
            win = majority_vote(ans, weights)
            from rstar.grading import answers_equal

            best = next((a for a in answers if a["answer"] == win), None)
            if best is None:
                best = next(a for a in answers if answers_equal(a["answer"], win))
        else:
            def key(a: dict[str, Any]) -> float:
                v = a["value"]
                return float("-inf") if v is None else v
            best = answers[0]
            for a in answers[1:]:
                if key(a) > key(best):  # ties: the first terminal (creation order)
                    best = a
        return {"answer": best["answer"], "node": best["node"], "correct": best["correct"]}

    def _write_all(self, items: list[tuple[_Tree, dict[str, Any]]], writer: ResultWriter | None,
                   results: dict[str, SearchResult], bar: _Progress) -> None:
        """Append the records finished together with one write and one fsync, then hand
        each to ``_write`` (results, counters, progress, ``on_record``)."""
        if writer is not None:
            writer.write_many([rec for _, rec in items])
        for t, rec in items:
            self._write(t, rec, None, results, bar)

    def _write(self, t: _Tree, rec: dict[str, Any], writer: ResultWriter | None,
               results: dict[str, SearchResult], bar: _Progress) -> None:
        if writer is not None:
            writer.write(rec)
        res = _result_of(rec)
        results[res.id] = res
        self.stats.problems += 1
        if res.correct:
            self.stats.solved += 1
        bar.done(bool(res.correct))
        if self.on_record is not None:
            self.on_record(rec)


def _result_of(rec: dict[str, Any]) -> SearchResult:
    ch = rec.get("chosen") or {}
    return SearchResult(str(rec["id"]), ch.get("answer"), ch.get("correct"), rec)


class _Progress:
    """tqdm bar: problems done, nodes, tokens/s, executions/s, solved fraction."""

    def __init__(self, total: int, initial: int, stats: SearchStats, *, enabled: bool) -> None:
        self.stats = stats
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.solved = 0
        self.done_n = 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="search", unit="problem", dynamic_ncols=True)

    def done(self, solved: bool) -> None:
        self.done_n += 1
        self.solved += int(solved)
        if self.bar is not None:
            self.bar.update(1)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        if self.bar is None:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        s = self.stats
        self.bar.set_postfix(
            nodes=s.nodes, tok_s=f"{s.tokens / dt:.0f}", exec_s=f"{s.execs / dt:.0f}",
            solved=f"{self.solved / max(self.done_n, 1):.2f}", refresh=False,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def search(
    problems: Sequence[Any],
    generator: Any,
    scorer: Any = None,
    config: SearchConfig | None = None,
    *,
    sandbox: Any = None,
    grader: Any = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> list[SearchResult]:
    """Search ``problems`` and return one ``SearchResult`` per problem (in order)."""
    with Searcher(generator, scorer, config, sandbox=sandbox, grader=grader) as s:
        return s.run(problems, out, progress=progress)
