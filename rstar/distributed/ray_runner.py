"""Searching problems on a Ray cluster: one actor per accelerator (or CPU slot), batches of
problems handed out by the driver, records streamed back and written by the driver.

How it works (docs/distributed.md has the long version):

* Each actor (``SearchWorker``) builds its generator, scorer, sandbox pool and forest once,
  through ``rstar.distributed.job.build_searcher``, the code path of a local run; it then
  searches whole batches of problems with that ``Searcher``. ``search(batch)`` is a Ray
  streaming generator: every record is sent back the moment its problem finishes.
* The driver keeps the queue of problems, gives each idle actor the next batch, and writes
  every record it receives with ``rstar.search.driver.ResultWriter`` (the same per-problem
  JSONL as a local run, one fsynced ``O_APPEND`` write per problem). It is the only writer,
  and it writes an id at most once, so every problem is in the output exactly once.
* An actor that dies (killed, out of memory, node lost) ends its call with a Ray error; the
  problems of its batch that had not come back are queued again and, when restarts are
  allowed, a new actor replaces the dead one. A batch that raises (a Python error in the
  search) is handled the same way, except that the actor lives on.
* Poison problems: each problem counts the failed calls it was part of. After its first
  failure a problem only runs alone (a batch of one), so its later failures are its own;
  after ``max_retries`` further failures it is written as a failure record
  (``failed: true``, ``error``, ``attempts``) and never tried again. Problems that merely
  shared a batch with a poison problem fail once and then succeed on their own.
* The driver itself can be killed and restarted: it reopens the output, skips every id
  already there (failure records included) and searches the rest. The problems that were in
  flight are searched again (their records had not been written).

Ray is imported inside the functions of this module only."""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rstar.distributed.job import SearchComponents, SearchJob, build_components, build_searcher
from rstar.distributed.shard import failure_record

logger = logging.getLogger(__name__)

EventHook = Callable[[str, dict[str, Any]], None]


# --------------------------------------------------------------------------- the actor
class SearchWorker:
    """One searching process (made a Ray actor by ``ray.remote`` at run time).

    ``cpus`` sets torch's thread count when the job does not, and the sandbox pool size when
    the config does not (``sandbox.workers`` 0 or unset would mean every core of the node in
    every actor)."""

    def __init__(self, job: SearchJob, index: int = 0, cpus: float = 1.0) -> None:
        import dataclasses

        self.index = index
        self.job = job
        if job.torch_threads is None and job.factory is None:
            self.job = dataclasses.replace(job, torch_threads=max(1, int(cpus)))
        self.components: SearchComponents = build_components(self.job)
        sb = dict(self.job.search_config().sandbox)
        if self.components.sandbox is None and not sb.get("workers"):
            from rstar.sandbox import Sandbox, SandboxConfig

            sb["workers"] = max(1, int(cpus))
            self.components.sandbox = Sandbox(SandboxConfig(**sb))
        self.searcher: Any = None
        self.searched = 0

    def info(self) -> dict[str, Any]:
        """Where this actor runs (its pid is what a test kills)."""
        out: dict[str, Any] = {"index": self.index, "pid": os.getpid(), "host": socket.gethostname()}
        try:
            import ray

            ctx = ray.get_runtime_context()
            out["node_id"] = ctx.get_node_id()
            out["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]
        except Exception:  # noqa: BLE001 - informative only
            pass
        return out

    def _get_searcher(self) -> Any:
        if self.searcher is None:
            self.searcher = build_searcher(self.job, self.components)
        return self.searcher

    def search(self, problems: Sequence[Any]):  # type: ignore[no-untyped-def]
        """Search a batch; yields lists of records as problems finish (every record that is
        ready when the previous list went out: one Ray object per list, not per record)."""
        items: queue.Queue[Any] = queue.Queue()
        done = object()
        searcher = self._get_searcher()

        def run() -> None:
            try:
                searcher.on_record = items.put
                searcher.run(list(problems), None, progress=False)
                items.put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the generator below
                items.put(_Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc()))

        th = threading.Thread(target=run, name="rstar-search", daemon=True)
        th.start()
        finished = False
        while not finished:
            got = [items.get()]
            while True:
                try:
                    got.append(items.get_nowait())
                except queue.Empty:
                    break
            recs = []
            for item in got:
                if item is done:
                    finished = True
                elif isinstance(item, _Failure):
                    if recs:
                        self.searched += len(recs)
                        yield recs
                    th.join()
                    self._reset()
                    raise RuntimeError(f"search of a batch failed: {item.error}\n{item.trace}")
                else:
                    recs.append(item)
            if recs:
                self.searched += len(recs)
                yield recs
        th.join()
        searcher.on_record = None

    def _reset(self) -> None:
        """After a failed batch the searcher may hold half-done trees: build a fresh one."""
        if self.searcher is not None:
            try:
                self.searcher.close()
            except Exception:  # noqa: BLE001
                logger.exception("closing a failed searcher")
        self.searcher = None

    def echo(self, payload: Any = None) -> Any:
        """A round trip with a payload (the benchmark's overhead probe)."""
        return payload

    def close(self) -> None:
        self._reset()
        self.components.close()


@dataclass
class _Failure:
    error: str
    trace: str


# --------------------------------------------------------------------------- driver state
@dataclass
class RayRunStats:
    """What happened in one run (``RayRunner.stats``)."""

    problems: int = 0  # problems of the run (after the shard)
    resumed: int = 0  # already in the output when the run started
    written: int = 0  # records written by this run (failure records included)
    failed: int = 0  # failure records written
    batches: int = 0  # calls made
    searched: int = 0  # distinct problems handed to actors by this run
    actor_starts: int = 0
    actor_deaths: int = 0  # actors lost while they held a batch or while starting
    batch_errors: int = 0  # calls that raised in the search (actor alive)
    requeued: int = 0  # problem re-queues after a failed call
    duplicates_ignored: int = 0  # records for ids already written (never written twice)
    wall_s: float = 0.0
    startup_s: float = 0.0  # run start -> first batch handed out (placement, imports, model loading)
    search_s: float = 0.0  # first batch handed out -> last record written
    actors: list[dict[str, Any]] = field(default_factory=list)  # info() of every started actor


@dataclass
class _Slot:
    index: int
    handle: Any
    state: str = "starting"  # starting | idle | busy | dead
    info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Call:
    cid: int
    slot: _Slot
    problems: list[int]  # indices into the problem list
    remaining: set[str]
    last_progress: float = field(default_factory=time.monotonic)


def _is_task_error(exc: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(exc, rex.RayTaskError) and not isinstance(exc, rex.RayActorError)


class RayRunner:
    """Drives one run over a set of actors; see the module docstring. Use ``run_ray`` (or
    ``rstar.distributed.run_search_job``) rather than this class directly."""

    def __init__(
        self,
        job: SearchJob,
        *,
        num_actors: int | None = None,
        actor_options: dict[str, Any] | None = None,
        batch_size: int | None = None,
        max_retries: int = 1,
        max_actor_restarts: int | None = None,
        max_consecutive_failures: int | None = None,
        actor_start_timeout_s: float | None = 1800.0,
        stall_timeout_s: float | None = None,
        on_event: EventHook | None = None,
        keep_records: bool = True,
        min_ready_actors: int = 1,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.job = job
        self.cfg = job.search_config()
        opts = {"num_cpus": 1, "num_gpus": 0}
        opts.update(actor_options or {})
        self.actor_options = opts
        self.num_actors = num_actors
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.max_actor_restarts = max_actor_restarts
        self.max_consecutive_failures = max_consecutive_failures
        self.actor_start_timeout_s = actor_start_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.on_event = on_event
        self.keep_records = keep_records
        self.min_ready_actors = min_ready_actors
        self.stats = RayRunStats()

    # ------------------------------------------------------------------ helpers
    def _emit(self, kind: str, **info: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, info)

    def _default_num_actors(self) -> int:
        import ray

        res = ray.cluster_resources()
        gpus = float(self.actor_options.get("num_gpus") or 0)
        cpus = float(self.actor_options.get("num_cpus") or 0)
        if gpus > 0:
            n = int(res.get("GPU", 0) // gpus)
        elif cpus > 0:
            n = int(res.get("CPU", 0) // cpus)
        else:
            n = 1
        if n < 1:
            raise RuntimeError(f"the cluster ({res.get('CPU', 0)} CPUs, {res.get('GPU', 0)} GPUs) cannot hold "
                               f"one actor with {self.actor_options}")
        return n

    # ------------------------------------------------------------------ the run
    def run(self, problems: Sequence[Any], out: str | Path | None = None, *,
            progress: bool = True) -> list[Any]:
        import ray

        from rstar.search.driver import ResultWriter, SearchResult

        t_start = time.perf_counter()
        ids = [str(p.id) for p in problems]
        if len(set(ids)) != len(ids):
            raise ValueError("problem ids must be unique (problems are keyed by id, never by question)")
        writer = ResultWriter(out) if out is not None else None
        records: dict[str, dict[str, Any]] = {}
        if writer is not None:
            if not self.keep_records:  # the writer keeps what it wrote / found: keep summaries only
                writer.done = _SlimDict({k: v for k, v in writer.done.items()})
            for i in ids:
                if i in writer.done:
                    records[i] = writer.done[i]
        todo = [k for k, i in enumerate(ids) if i not in records]
        st = self.stats
        st.problems, st.resumed = len(ids), len(ids) - len(todo)
        if st.resumed:
            logger.info("resuming: %d of %d problems already in %s", st.resumed, len(ids), out)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), initial=st.resumed, desc="search (ray)", unit="problem", dynamic_ncols=True)

        slots: list[_Slot] = []
        calls: dict[int, _Call] = {}
        events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        try:
            if todo:
                self._loop(problems, ids, todo, writer, records, slots, calls, events, bar)
        finally:
            # idle actors close their backends (vLLM engines, sandbox pools) before they go
            idle = [s for s in slots if s.state == "idle"]
            if idle:
                try:
                    ray.wait([s.handle.close.remote() for s in idle], num_returns=len(idle), timeout=30)
                except Exception:  # noqa: BLE001 - killed below anyway
                    pass
            for s in slots:
                if s.state != "dead":
                    try:
                        ray.kill(s.handle, no_restart=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
            # The helper threads block in Ray calls; once their actors are gone those calls
            # fail and the threads end. Wait for them, so that nobody is inside Ray when the
            # caller disconnects (a thread inside Ray at ray.shutdown / exit can crash).
            deadline = time.monotonic() + 60
            for th in self._threads:
                th.join(timeout=max(0.0, deadline - time.monotonic()))
            if any(th.is_alive() for th in self._threads):
                logger.warning("%d Ray helper threads still running", sum(th.is_alive() for th in self._threads))
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            st.wall_s = time.perf_counter() - t_start
        out_list = []
        for i in ids:
            rec = records[i]
            ch = rec.get("chosen") or {}
            out_list.append(SearchResult(i, ch.get("answer"), ch.get("correct"), rec))
        return out_list

    def _loop(self, problems: Sequence[Any], ids: list[str], todo: list[int], writer: Any,
              records: dict[str, dict[str, Any]], slots: list[_Slot], calls: dict[int, _Call],
              events: queue.Queue[tuple[Any, ...]], bar: Any) -> None:
        import ray

        st = self.stats
        worker_cls = ray.remote(SearchWorker)
        n_act = self.num_actors or self._default_num_actors()
        batch = self.batch_size or max(1, min(4 * self.cfg.concurrent_trees, math.ceil(len(todo) / (2 * n_act))))
        n_act = max(1, min(n_act, math.ceil(len(todo) / batch)))
        restarts_left = self.max_actor_restarts if self.max_actor_restarts is not None else math.inf
        breaker = self.max_consecutive_failures or max(8, 4 * n_act)
        streak = 0  # failed calls since the last record of a search that succeeded
        pending: collections.deque[int] = collections.deque(todo)
        suspects: collections.deque[int] = collections.deque()  # failed once: run alone
        failures: dict[int, int] = collections.Counter()
        last_error: dict[int, str] = {}
        cid_next = [0]
        handed: set[int] = set()
        t_loop = time.perf_counter()
        t_first: list[float] = []
        logger.info("ray: %d problems, %d actors (%s each), batches of %d", len(todo), n_act,
                    self.actor_options, batch)

        def start_actor() -> None:
            idx = len(slots)
            handle = worker_cls.options(max_restarts=0, max_task_retries=0, **self.actor_options).remote(
                self.job, idx, float(self.actor_options.get("num_cpus") or 1))
            slot = _Slot(idx, handle)
            slots.append(slot)
            st.actor_starts += 1

            def wait_ready() -> None:
                try:
                    info = ray.get(handle.info.remote())
                    events.put(("ready", slot, info))
                except BaseException as exc:  # noqa: BLE001
                    events.put(("start_failed", slot, exc))

            th = threading.Thread(target=wait_ready, name=f"rstar-ray-ready-{idx}", daemon=True)
            self._threads.append(th)
            th.start()

        def consume(call: _Call, gen: Any) -> None:
            try:
                for ref in gen:
                    for rec in ray.get(ref):
                        events.put(("record", call, rec))
                events.put(("end", call, None))
            except BaseException as exc:  # noqa: BLE001 - the main loop decides
                events.put(("end", call, exc))

        def write(rec: dict[str, Any], slot: _Slot | None) -> None:
            rid = str(rec["id"])
            if rid in records:  # never twice (a late record of a re-queued problem)
                st.duplicates_ignored += 1
                return
            if writer is not None:
                writer.write(rec)
            records[rid] = rec if self.keep_records else slim_record(rec)
            st.written += 1
            if rec.get("failed"):
                st.failed += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(actors=sum(s.state in ("idle", "busy") for s in slots),
                                deaths=st.actor_deaths, failed=st.failed, refresh=False)
            self._emit("record", id=rid, slot=None if slot is None else slot.index, failed=bool(rec.get("failed")))

        def dispatch() -> None:
            if not t_first:  # the first batch waits for min_ready_actors (of those still alive)
                ready = sum(s.state in ("idle", "busy") for s in slots)
                if ready < min(self.min_ready_actors, sum(s.state != "dead" for s in slots)):
                    return
            for slot in slots:
                if slot.state != "idle":
                    continue
                if suspects:
                    take = [suspects.popleft()]
                elif pending:
                    take = [pending.popleft() for _ in range(min(batch, len(pending)))]
                else:
                    return
                take = [k for k in take if ids[k] not in records]
                if not take:
                    continue
                cid_next[0] += 1
                call = _Call(cid_next[0], slot, take, {ids[k] for k in take})
                calls[call.cid] = call
                slot.state = "busy"
                st.batches += 1
                if not t_first:
                    t_first.append(time.perf_counter())
                    st.startup_s = t_first[0] - t_loop
                handed.update(take)
                st.searched = len(handed)
                gen = slot.handle.search.options(num_returns="streaming").remote([problems[k] for k in take])
                th = threading.Thread(target=consume, args=(call, gen), name=f"rstar-ray-call-{call.cid}", daemon=True)
                self._threads.append(th)
                th.start()
                self._emit("batch", slot=slot.index, ids=[ids[k] for k in take])

        def fail_call(call: _Call, error: str) -> None:
            """The unfinished problems of a failed call: count, then re-queue or give up."""
            nonlocal streak
            streak += 1
            if streak >= breaker:
                raise RuntimeError(
                    f"{streak} calls in a row failed with no problem finishing in between: this looks "
                    f"systematic (a broken node, model or config), not a poison problem; stopping. "
                    f"Last error: {error}")
            for k in call.problems:
                rid = ids[k]
                if rid not in call.remaining or rid in records:
                    continue
                failures[k] += 1
                last_error[k] = error
                if failures[k] > self.max_retries:
                    write(failure_record(problems[k], error, failures[k], self.cfg.mode, _cfg_dict(self.cfg)),
                          None)
                    logger.error("problem %s failed %d times; recorded as a failure: %s", rid, failures[k],
                                 error.splitlines()[0] if error else "")
                    self._emit("failed", id=rid, error=error, attempts=failures[k])
                else:
                    suspects.append(k)
                    st.requeued += 1
                    self._emit("requeued", id=rid, attempts=failures[k])

        def actor_lost(slot: _Slot, why: str) -> None:
            nonlocal restarts_left
            slot.state = "dead"
            st.actor_deaths += 1
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
            self._emit("actor_died", slot=slot.index, pid=slot.info.get("pid"), error=why)
            unfinished = len(pending) + len(suspects) + sum(len(c.remaining) for c in calls.values())
            if unfinished and restarts_left > 0:
                restarts_left -= 1
                logger.warning("actor %d lost (%s); starting a replacement", slot.index, why.splitlines()[0])
                start_actor()
            else:
                logger.warning("actor %d lost (%s)", slot.index, why.splitlines()[0])

        for _ in range(n_act):
            start_actor()
        t_wait = time.monotonic()
        warned = 0.0
        while len(records) < len(ids):
            live = [s for s in slots if s.state != "dead"]
            if not live:
                left = len(ids) - len(records)
                raise RuntimeError(f"every actor died and no restart is left; {left} problems unfinished "
                                   "(run again to resume from the output)")
            try:
                ev = events.get(timeout=1.0)
            except queue.Empty:
                ev = None
            now = time.monotonic()
            if ev is not None:
                kind = ev[0]
                if kind == "ready":
                    slot, info = ev[1], ev[2]
                    if slot.state == "starting":
                        slot.info = info
                        slot.state = "idle"
                        self.stats.actors.append(info)
                        self._emit("actor_ready", slot=slot.index, **info)
                elif kind == "start_failed":
                    slot, exc = ev[1], ev[2]
                    if slot.state == "starting":
                        logger.error("actor %d failed to start: %s", slot.index, exc)
                        slot.state = "dead"
                        try:
                            ray.kill(slot.handle, no_restart=True)
                        except Exception:  # noqa: BLE001
                            pass
                        self._emit("actor_start_failed", slot=slot.index, error=str(exc))
                        if not any(s.state in ("idle", "busy") for s in slots) and not any(
                                s.state == "starting" for s in slots):
                            raise RuntimeError(f"no actor could start: {exc}") from exc
                elif kind == "record":
                    call, rec = ev[1], ev[2]
                    call.remaining.discard(str(rec["id"]))
                    streak = 0
                    call.last_progress = now
                    write(rec, call.slot)
                elif kind == "end":
                    call, exc = ev[1], ev[2]
                    calls.pop(call.cid, None)
                    slot = call.slot
                    if exc is None:
                        if call.remaining:  # cannot happen with a correct worker; never lose them
                            fail_call(call, "the actor returned no record for these problems")
                        if slot.state == "busy":
                            slot.state = "idle"
                    elif _is_task_error(exc):
                        st.batch_errors += 1
                        fail_call(call, _short(exc))
                        if slot.state == "busy":
                            slot.state = "idle"
                        self._emit("batch_error", slot=slot.index, error=_short(exc))
                    else:
                        fail_call(call, f"actor died: {_short(exc)}")
                        if slot.state != "dead":
                            actor_lost(slot, _short(exc))
            # watchdogs
            if self.stall_timeout_s is not None:
                for call in list(calls.values()):
                    if call.slot.state == "busy" and now - call.last_progress > self.stall_timeout_s:
                        logger.error("actor %d made no progress for %.0f s: killing it", call.slot.index,
                                     now - call.last_progress)
                        call.last_progress = now
                        ray.kill(call.slot.handle, no_restart=True)  # its call then ends with an actor error
            starting = [s for s in slots if s.state == "starting"]
            if starting and not any(s.state in ("idle", "busy") for s in slots):
                if self.actor_start_timeout_s is not None and now - t_wait > self.actor_start_timeout_s:
                    raise RuntimeError(f"no actor started within {self.actor_start_timeout_s:.0f} s; "
                                       f"the cluster cannot place {self.actor_options}? ({ray.cluster_resources()})")
                if now - t_wait > 60 and now - warned > 60:
                    warned = now
                    logger.warning("waiting for actors to be placed (%s each; cluster %s)", self.actor_options,
                                   ray.cluster_resources())
            else:
                t_wait = now
            dispatch()
        if t_first:
            st.search_s = time.perf_counter() - t_first[0]


def slim_record(rec: dict[str, Any]) -> dict[str, Any]:
    """What the driver keeps of a record when ``keep_records=False``: id, chosen answer,
    stats and the failure fields (the whole tree is only in the output file)."""
    keep = ("id", "answer", "mode", "chosen", "stats", "failed", "error", "attempts")
    return {k: rec[k] for k in keep if k in rec}


class _SlimDict(dict):  # type: ignore[type-arg]
    """``ResultWriter.done`` that stores summaries instead of whole trees."""

    def __init__(self, items: dict[str, Any]) -> None:
        super().__init__({k: slim_record(v) for k, v in items.items()})

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, slim_record(value))


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[-2000:]}"


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    from rstar.config import to_dict

    return to_dict(cfg)


# --------------------------------------------------------------------------- connect
def connect(ray_address: str | bool | None = True, init_kwargs: dict[str, Any] | None = None) -> bool:
    """Make sure this process is connected to Ray; returns True when it connected here (and
    should ``ray.shutdown()`` at the end), False when it already was.

    ``ray_address``: ``True`` (or ``""``) = Ray's default resolution (``RAY_ADDRESS``, else the
    cluster that ``ray start`` made on this machine, else a new local one); ``"auto"`` = an
    existing cluster or an error; ``"local"`` = always a new local cluster; anything else is
    a cluster address (``host:port`` or ``ray://host:10001``)."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise ImportError("the Ray path needs Ray: pip install 'rstar[distributed]'") from exc
    if ray.is_initialized():
        return False
    kwargs = dict(init_kwargs or {})
    kwargs.setdefault("logging_level", logging.WARNING)
    if ray_address is True or ray_address == "" or ray_address is None:
        ray.init(**kwargs)
    else:
        ray.init(address=str(ray_address), **kwargs)
    return True


def run_ray(
    job: SearchJob,
    problems: Sequence[Any],
    out: str | Path | None = None,
    *,
    ray_address: str | bool | None = True,
    ray_init_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    **runner_kwargs: Any,
) -> tuple[list[Any], RayRunStats]:
    """Connect (``connect``), run a ``RayRunner`` and disconnect when connected here.
    Returns the results (problem order) and the run's ``RayRunStats``."""
    owned = connect(ray_address, ray_init_kwargs)
    try:
        runner = RayRunner(job, **runner_kwargs)
        results = runner.run(problems, out, progress=progress)
        return results, runner.stats
    finally:
        if owned:
            import ray

            ray.shutdown()
