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
import hashlib
import json
import logging
import os
import time
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
    block_program,
    next_error_count,
    observation_text,
    parse_step,
)

logger = logging.getLogger(__name__)

_LOCAL_MASK = 0xFFFFFFFF


# --------------------------------------------------------------------------- node store
class _Node:
    """One step of one tree (stored once; paths are assembled from the engine's path)."""

    __slots__ = (
        "parent", "depth", "text", "ids", "kind", "terminal", "valid", "reason", "answer",
        "correct", "ppm", "reward", "exec_ok", "exec_status", "timed_out", "errors", "closes",
        "eid", "local", "rollout",
    )

    def __init__(self, parent: int, depth: int, text: str, ids: list[int], kind: str) -> None:
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
        self.errors = 0
        self.closes = False
        self.eid = -1
        self.local = 0
        self.rollout = 0  # rollouts started in its tree when it was created (anytime metrics)

    def invalidate(self, reason: str) -> None:
        self.terminal = True
        self.valid = False
        self.reason = reason


class _Tree:
    __slots__ = (
        "key", "index", "problem", "tid", "nodes", "prompt_ids", "started", "in_flight", "closed",
        "root_expanded", "beam_jobs", "level", "width", "finished", "t0", "tokens", "execs",
        "expansions", "finalizing",
    )

    def __init__(self, key: int, index: int, problem: Any, prompt_ids: list[int]) -> None:
        self.key = key
        self.index = index
        self.problem = problem
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
    wall_s: float = 0.0


# --------------------------------------------------------------------------- output
class ResultWriter:
    """Append-only JSONL of finished problems, safe against kills at any moment.

    Each problem is one ``os.write`` of one full line on an ``O_APPEND`` descriptor, then
    fsync. On open, a torn last line (a kill mid-write) is cut off, and the ids already
    present are skipped by the search."""

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
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        n = os.write(self._fd, line)
        if n != len(line):  # pragma: no cover - regular files write fully
            raise OSError(f"short write to {self.path}")
        os.fsync(self._fd)
        self.done[str(record["id"])] = record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --------------------------------------------------------------------------- batching
class _Batcher:
    """Collects items submitted by many coroutines and runs ``fn`` on them in a worker
    thread, one batch at a time, so PPM scoring and grading overlap with generation."""

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 4096) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[list[Any], asyncio.Future[list[Any]]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, items: list[Any]) -> list[Any]:
        if not items:
            return []
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((items, fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            batch = [first]
            total = len(first[0])
            while not self._queue.empty() and total < self.max_batch:
                item = self._queue.get_nowait()
                batch.append(item)
                total += len(item[0])
            flat = [x for items, _ in batch for x in items]
            try:
                out = await asyncio.to_thread(self.fn, flat)
            except Exception as exc:  # hand the error to every waiter
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            pos = 0
            for items, fut in batch:
                if not fut.done():
                    fut.set_result(list(out[pos : pos + len(items)]))
                pos += len(items)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._task = None
        self._queue = None


def _request_seed(base: int, pid: str, leaf: int, attempt: int) -> int:
    h = hashlib.blake2b(f"{base}|{pid}|{leaf}|{attempt}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------- searcher
class Searcher:
    """Searches many problems at once with one generator, scorer, sandbox and grader.

    ``generator`` implements ``rstar.backends.Generator`` (its ``tokenizer`` encodes
    prompts); ``scorer`` implements ``rstar.backends.Scorer`` (the PPM; required by the
    PPM-guided configs); ``sandbox`` defaults to ``rstar.sandbox.Sandbox(config.sandbox)``
    and ``grader`` to ``rstar.grading.Grader()`` (both closed by ``close`` only when created
    here)."""

    def __init__(
        self,
        generator: Any,
        scorer: Any = None,
        config: SearchConfig | None = None,
        *,
        sandbox: Any = None,
        grader: Any = None,
        forest: Any = None,
    ) -> None:
        self.cfg = config or SearchConfig()
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
        self._exported: dict[int, dict[str, list[Any]]] = {}
        self._cfg_dict = to_dict(self.cfg)

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
        self._grade_b = _Batcher(self._grade_fn)
        self._score_b = _Batcher(self._score_fn, max_batch=1024)
        t0 = time.perf_counter()
        try:
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
            trees.append(_Tree(key, index, p, encode_prompt(self.tok, text)))
        if trees:
            tids = self.forest.add_trees(np.array([t.key << 32 for t in trees], dtype=np.uint64))
            for t, tid in zip(trees, tids.tolist()):
                t.tid = int(tid)
                t.nodes[0].eid = int(self.forest.roots([tid])[0])
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
        t = job.tree
        ids = list(t.prompt_ids)
        for local in job.path[1:]:
            ids.extend(t.nodes[local].ids)
        job.prompt_ids = ids
        g = self.cfg.generation
        return self._GenReq(
            prompt_ids=ids, n=job.n, temperature=g.temperature, top_p=g.top_p,
            max_new_tokens=g.max_new_tokens, stop=tuple(g.stop),
            seed=_request_seed(self.cfg.seed, str(t.problem.id), job.leaf, t.expansions),
        )

    def _candidates(self, job: _Job, completions: Sequence[Any]) -> list[tuple[_Node, str]]:
        """Parse, dedup and collapse the completions; returns (node, program) for code steps."""
        t0 = time.perf_counter()
        cfg = self.cfg
        comps = list(completions)
        job.tree.tokens += sum(len(c.token_ids) for c in comps)
        self.stats.tokens += sum(len(c.token_ids) for c in comps)
        if cfg.answer_collapse:
            for c in comps:
                if c.stop == END_OF_ANSWER:
                    comps = [c]
                    break
        seen: set[str] = set()
        depth = job.depth + 1
        tree = job.tree
        parent = tree.nodes[job.leaf]
        path_texts = [tree.nodes[i].text for i in job.path[1:]]
        skip = None
        if cfg.skip_failed_code == "timeout":
            skip = [tree.nodes[i].timed_out for i in job.path[1:]]
        elif cfg.skip_failed_code == "all":
            skip = [tree.nodes[i].exec_ok is False for i in job.path[1:]]
        programs: list[tuple[_Node, str]] = []
        cands = []
        for c in comps:
            if cfg.dedup:
                if c.text in seen:
                    continue
                seen.add(c.text)
            ps = parse_step(c.text, c.stop)
            node = _Node(job.leaf, depth, c.text, list(c.token_ids), ps.kind.value)
            node.errors = parent.errors
            node.rollout = tree.started
            if depth > cfg.max_depth:
                node.invalidate("depth")
            elif ps.kind is StepKind.ANSWER:
                node.terminal = True
                node.answer = ps.answer
                if ps.answer is None:
                    node.invalidate("no_answer")
            elif ps.kind is StepKind.TRUNCATED:
                node.invalidate("truncated")
            else:
                node.closes = ps.closes_block
                programs.append((node, block_program(path_texts, c.text, skip)))
            cands.append(node)
        job.cands = cands
        self.stats.step_s += time.perf_counter() - t0
        return programs

    def _apply_exec(self, job: _Job, node: _Node, result: Any) -> None:
        ok = bool(result.ok)
        node.exec_ok = ok
        status = getattr(result, "status", None)
        node.exec_status = getattr(status, "value", str(status)) if status is not None else None
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

    def _needs_grade_now(self, job: _Job) -> bool:
        return job.kind == "mcts" and self.cfg.value in ("terminal", "ppm_init")

    def _to_score(self, job: _Job) -> list[_Node]:
        if self.scorer is None:
            return []
        cfg = self.cfg
        out = []
        for c in job.cands:
            if not c.valid:
                continue
            if job.kind == "mcts":
                if not c.terminal and cfg.value in ("ppm", "ppm_init"):
                    out.append(c)
                elif c.terminal and cfg.value == "ppm":
                    out.append(c)
            elif job.kind == "beam":
                out.append(c)
            elif c.terminal:  # chains: the answer step's value (best-of-N by PPM)
                out.append(c)
        return out

    def _score_request(self, job: _Job, node: _Node) -> Any:
        return self._ScoreReq(prompt_ids=job.prompt_ids + node.ids)

    def _grade_fn(self, pairs: list[tuple[str, str]]) -> list[bool]:
        return list(self.grader.grade_many([p for p, _ in pairs], [g for _, g in pairs]))

    def _score_fn(self, reqs: list[Any]) -> list[float]:
        return [float(v) for v in self.scorer.score(reqs)]

    # async pipeline: one coroutine per job ------------------------------------------
    async def _job_task(self, job: _Job, ready: asyncio.Queue[Any]) -> None:
        try:
            comps = await self.gen.agenerate(self._request(job))
            programs = self._candidates(job, comps)
            if programs:
                results = await asyncio.gather(*(self.sandbox.arun(p) for _, p in programs))
                for (node, _), r in zip(programs, results):
                    self._apply_exec(job, node, r)
            await self._post(job)
            ready.put_nowait(("job", job))
        except BaseException as exc:  # the main loop re-raises
            ready.put_nowait(("error", exc))
            if not isinstance(exc, Exception):
                raise

    async def _post(self, job: _Job) -> None:
        """Grade (when values need it) and PPM-score the children of one job."""
        gold = str(job.tree.problem.answer)
        if self._needs_grade_now(job):
            targets = [c for c in job.cands if c.valid and c.terminal and c.answer is not None]
            if targets:
                res = await self._grade_b.submit([(c.answer, gold) for c in targets])
                for c, ok in zip(targets, res):
                    c.correct = bool(ok)
        scored = self._to_score(job)
        if scored:
            vals = await self._score_b.submit([self._score_request(job, c) for c in scored])
            for c, v in zip(scored, vals):
                c.ppm = float(v)

    async def _run_async(self, todo: list[tuple[int, Any]], writer: ResultWriter | None,
                         results: dict[str, SearchResult], bar: _Progress) -> None:
        ready: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task[Any]] = set()
        pending = list(reversed(todo))
        inflight = 0

        def launch(jobs: list[_Job]) -> None:
            nonlocal inflight
            for j in jobs:
                task = asyncio.ensure_future(self._job_task(j, ready))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                inflight += 1

        def admit() -> list[_Tree]:
            take = []
            while pending and len(self._trees) + len(take) < self.cfg.concurrent_trees:
                take.append(pending.pop())
            return self._new_trees(take)

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
                item = await ready.get()
                batch = [item]
                while not ready.empty():
                    batch.append(ready.get_nowait())
                t0 = time.perf_counter()
                jobs = []
                for kind, payload in batch:
                    if kind == "error":
                        raise payload
                    if kind == "final":
                        inflight -= 1
                        tree, rec = payload
                        self._write(tree, rec, writer, results, bar)
                        continue
                    inflight -= 1
                    jobs.append(payload)
                touched = self._commit(jobs) if jobs else []
                new_jobs = self._continue(jobs) if jobs else []
                new_jobs += self._start(touched + admit())
                launch(new_jobs)
                for t in touched:
                    if t.key in self._trees and not t.finalizing and self._tree_done(t):
                        t.finalizing = True
                        inflight += 1
                        self._release(t)
                        asyncio.ensure_future(self._final_task(t, ready))
                self.stats.loop_s += time.perf_counter() - t0
                bar.refresh()
        finally:
            for task in list(tasks):
                task.cancel()

    async def _final_task(self, tree: _Tree, ready: asyncio.Queue[Any]) -> None:
        try:
            rec = await self._record(tree)
            ready.put_nowait(("final", (tree, rec)))
        except BaseException as exc:
            ready.put_nowait(("error", exc))
            if not isinstance(exc, Exception):
                raise

    async def _finish_all(self, writer: ResultWriter | None, results: dict[str, SearchResult],
                          bar: _Progress) -> bool:
        """Finalize every tree that is done; returns whether any was."""
        done = [t for t in self._trees.values() if not t.finalizing and self._tree_done(t)]
        for t in done:
            t.finalizing = True
            self._release(t)
        recs = await asyncio.gather(*(self._record(t) for t in done))
        for t, rec in zip(done, recs):
            self._write(t, rec, writer, results, bar)
        return bool(done)

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
                res = await asyncio.gather(*(self.sandbox.arun(p) for _, _, p in programs))
                for (j, node, _), r in zip(programs, res):
                    self._apply_exec(j, node, r)
            await asyncio.gather(*(self._post(j) for j in jobs))
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
        tickets, nch, payloads, terminal, rewards = [], [], [], [], []
        for j in jobs:
            t = j.tree
            base = len(t.nodes)
            for i, c in enumerate(j.cands):
                if c.terminal and c.valid:
                    if j.kind == "mcts" and cfg.value == "ppm":
                        c.reward = c.ppm if c.ppm is not None else 0.0
                    elif j.kind == "mcts":
                        c.reward = cfg.positive_reward if c.correct else cfg.negative_reward
                c.local = base + i
                payloads.append((t.key << 32) | (base + i))
                terminal.append(c.terminal)
                rewards.append(c.reward if c.reward is not None else 0.0)
            t.nodes.extend(j.cands)
            tickets.append(j.ticket)
            nch.append(len(j.cands))
            t.expansions += 1
            if j.leaf == 0:
                t.root_expanded = True
        self.stats.expansions += len(jobs)
        self.stats.commits += 1
        first = f.expand(
            np.array(tickets, dtype=np.uint64), np.array(nch, dtype=np.uint32),
            payloads=np.array(payloads, dtype=np.uint64), terminal=np.array(terminal, dtype=bool),
            rewards=np.array(rewards, dtype=np.float64),
        ).tolist()
        init_n, init_v, back_n, back_v, inv_n = [], [], [], [], []
        for j, fc in zip(jobs, first):
            for i, c in enumerate(j.cands):
                c.eid = fc + i
                if not c.valid:
                    inv_n.append(c.eid)
                elif j.kind == "mcts":
                    if c.terminal:
                        back_n.append(c.eid)
                        back_v.append(c.reward)
                    elif c.ppm is not None:
                        init_n.append(c.eid)
                        init_v.append(c.ppm)
                elif c.ppm is not None:  # beam / chains: Q = PPM value of the step
                    init_n.append(c.eid)
                    init_v.append(c.ppm)
            self.stats.nodes += len(j.cands)
        if init_n:
            f.set_values(np.array(init_n, dtype=np.uint32), np.array(init_v, dtype=np.float64))
        if back_n:
            f.backup_nodes(np.array(back_n, dtype=np.uint32), np.array(back_v, dtype=np.float64))
        if inv_n:
            f.mark_invalid(np.array(inv_n, dtype=np.uint32), cfg.invalid_value)
        f.cancel(np.array(tickets, dtype=np.uint64))
        touched = {}
        for j in jobs:
            j.tree.in_flight -= 1
            touched[j.tree.key] = j.tree
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
    def _release(self, t: _Tree) -> None:
        """Export the tree's statistics from the engine, then free its nodes."""
        exp = self.forest.export_tree(t.tid)
        n = len(t.nodes)
        stats = {k: [None] * n for k in ("visits", "q", "init_value", "state")}
        for pay, v, q, iv, st in zip(exp["payload"].tolist(), exp["visits"].tolist(), exp["q"].tolist(),
                                     exp["init_value"].tolist(), exp["state"].tolist()):
            i = pay & _LOCAL_MASK
            stats["visits"][i] = v
            stats["q"][i] = q
            stats["init_value"][i] = None if iv != iv else iv
            stats["state"][i] = st
        self._exported[t.key] = stats
        self.forest.release_trees(np.array([t.tid], dtype=np.uint32))
        del self._trees[t.key]

    async def _record(self, t: _Tree) -> dict[str, Any]:
        cfg = self.cfg
        gold = str(t.problem.answer)
        todo = [c for c in t.nodes if c.terminal and c.valid and c.answer is not None and c.correct is None]
        if todo and cfg.grade_answers and gold:
            res = await self._grade_b.submit([(c.answer, gold) for c in todo])
            for c, ok in zip(todo, res):
                c.correct = bool(ok)
        stats = self._exported.pop(t.key)
        nodes = []
        for i, c in enumerate(t.nodes):
            nodes.append({
                "id": i, "parent": c.parent, "depth": c.depth, "text": c.text,
                "visits": stats["visits"][i], "q": stats["q"][i], "value": c.ppm,
                "reward": c.reward, "terminal": c.terminal, "valid": c.valid, "reason": c.reason,
                "kind": c.kind, "answer": c.answer, "correct": c.correct, "exec_ok": c.exec_ok,
                "exec_status": c.exec_status, "errors": c.errors, "rollout": c.rollout,
            })
        answers = []
        for i, c in enumerate(t.nodes):
            if c.terminal and c.valid and c.answer is not None:
                value = stats["q"][i] if cfg.mode == "mcts" else c.ppm
                answers.append({"node": i, "answer": c.answer, "value": value, "ppm": c.ppm,
                                "correct": c.correct})
        chosen = self._choose(t, answers)
        return {
            "id": str(t.problem.id), "question": t.problem.question, "answer": gold,
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
