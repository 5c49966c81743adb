"""Search overhead and pipelines: async vs lock-step on the same problems, same rollouts.

The generator is a stand-in with realistic latency (a server with continuous batching: each
request takes ``base + per_token * tokens`` seconds, independent of others; a lock-step
batched call returns when its longest request finishes), so the numbers isolate the
search's own CPU work from model time:

    python bench/bench_search.py --trees 1000 --rollouts 2 --n 4

Reports, per pipeline: wall time, generated tokens/s, problems/s, the process's CPU seconds
(``time.process_time``: every thread, so the engine's pool, the scoring/grading worker
threads and the lock-step generate/run_many threads are included) and two shares of wall
time:

* ``cpu %``: all CPU of the process during ``Searcher.run`` / wall time;
* ``search %``: the same minus the stand-ins' own CPU (``stand-in s``), measured with
  ``time.thread_time`` around every call of the stand-in generator's completion builder
  and of its latency timers (``_sleep`` / ``_fire``), the stand-in tokenizer, the stand-in
  scorer, grader and sandbox (``submit``, its result thread's own work, ``run_many``).
  Everything else is counted as the search: the driver, the engine, asyncio (the
  per-request tasks and the futures they wait on; the sandbox futures' callbacks, or with
  ``--sandbox-api arun`` the per-program coroutines and tasks), the worker-thread hops,
  garbage collection, building the JSON record of every problem.

The stand-ins are cheap (completions and their token ids are built once per distinct text
and shared; one integer hash per request; latency timers grouped per millisecond) and
deterministic (no ``hash()`` of strings, so every run builds the same trees). Step bodies
are realistic code by default (``--pad code``); ``--pad hash`` is the earlier all-``#``
filler, a worst case for CPython's substring search in the step parser. ``--repeat k``
alternates k runs of each pipeline and prints medians; ``--out DIR`` also writes the JSONL
records (one file per run). Target: ``search %`` <= 2% at 1,000 concurrent trees; async
faster than lock-step.

By default every request gets its latency whatever the load (a server of unlimited capacity:
~70,000 tokens/s at 1,000 trees, more than one GPU generates with the paper's 1.5B-7B
policies). ``--server-tok-s C`` caps what the stand-in serves at C tokens/s over all requests,
first come first served (a saturated GPU), on top of the per-request latency.
``--server-step-ms S`` returns results at engine-step boundaries S ms apart, as vLLM's engine
does and ``VLLMGenerator`` passes on (every request finished in a step comes back in one
hand-off); without it each request comes back at its own time, to the millisecond.
``--turn-interval-ms`` sets the async pipeline's ``SearchConfig.turn_interval_ms``;
``--busy-turn-interval-ms`` its ``busy_turn_interval_ms`` (pauses only while the stand-in's
``backlog()`` says work waits beyond what its capacity decodes at once).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import math
import os
import statistics
import threading
import time
import zlib
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

from rstar.backends import Completion, GenerationRequest  # noqa: F401 - the contract types
from rstar.search.config import SearchConfig
from rstar.search.driver import Searcher

logger = logging.getLogger("bench_search")

_M64 = (1 << 64) - 1


def _mix(x: int, y: int) -> int:
    """A cheap 64-bit mix (splitmix64 finaliser of x + golden * (y + 1))."""
    z = (x + 0x9E3779B97F4A7C15 * (y + 1)) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class _Tok:
    """A cheap deterministic tokenizer: 4 characters per token (ids are CRC32s of the chunks).
    ``cpu_s``: thread CPU spent in it (a stand-in for the model's tokenizer)."""

    chat_template = None

    def __init__(self) -> None:
        self.cpu_s = 0.0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        t0 = time.thread_time()
        b = text.encode()
        ids = [zlib.crc32(b[i : i + 4]) & 0xFFFF for i in range(0, len(b), 4)]
        self.cpu_s += time.thread_time() - t0
        return {"input_ids": ids}


#: Step bodies: a realistic mix of comments and code (``--pad code``), or the
#: earlier all-``#`` filler (``--pad hash``: a worst case for CPython's substring search,
#: whose skip table cannot skip ``#`` when the pattern holds a ``c``, as ``<code>`` does).
PADS = {
    "code": "# compute the next value from the previous ones\nvalue = (a + b) * c - d / e\n",
    "hash": "#",
}


class LatencyGenerator:
    """Steps drawn from a small vocabulary by a hash of the request (seed, prompt length);
    latency scales with the tokens generated. ``cpu_s``: thread CPU spent building
    completions and in the latency timers (the stand-in's own work, not the search's)."""

    def __init__(self, base_s: float, per_token_s: float, step_tokens: int, pad: str = "code",
                 server_tok_s: float = 0.0, server_step_s: float = 0.0) -> None:
        self.tokenizer = _Tok()
        self.base_s = base_s
        self.per_token_s = per_token_s
        self.step_tokens = step_tokens
        self.server_tok_s = server_tok_s
        self.server_step_s = server_step_s  # > 0: results come back at engine-step boundaries
        self._free_at = 0.0  # with a capacity: when the server has generated everything asked so far
        self.busy_s = 0.0
        self.cpu_s = 0.0
        width = max(4 * step_tokens - 30, 0)
        unit = PADS[pad]
        self._pad = (unit * (width // len(unit) + 1))[:width]
        self._cache: dict[tuple[Any, ...], Completion] = {}
        self._due: dict[tuple[Any, int], list[tuple[asyncio.Future[Any], Any]]] = {}

    def _build(self, key: tuple[Any, ...]) -> Completion:
        kind, a, b, stops = key
        pad = self._pad
        if kind == 0:
            text = f"\nx{a} = {b} {pad}\n<end_of_step>"
        elif kind == 1:
            text = f"\nprint({a}) {pad}\n<end_of_code>"
        elif kind == 2:
            text = f"\ny = undefined {pad}\n<end_of_step>"
        else:
            text = f"\n<answer>{pad} \\boxed{{{a}}}\n<end_of_answer>"
        stop = next((s for s in stops if text.endswith(s)), None)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.step_tokens]
        ids += [0] * (self.step_tokens - len(ids))
        return Completion(text, ids, stop, "stop" if stop else "length")

    def _comps(self, req: Any) -> list[Any]:
        t0 = time.thread_time()
        r0 = _mix(req.seed or 0, len(req.prompt_ids))
        cache = self._cache
        out = []
        for i in range(req.n):
            r = _mix(r0, i)
            c = r % 10
            if c < 5:
                key = (0, r % 7, r % 5, req.stop)
            elif c < 7:
                key = (1, r % 3, 0, req.stop)
            elif c < 8:
                key = (2, 0, 0, req.stop)
            else:
                key = (3, r % 3, 0, req.stop)
            comp = cache.get(key)
            if comp is None:
                comp = cache[key] = self._build(key)
            out.append(comp)
        self.cpu_s += time.thread_time() - t0
        return out

    def _latency(self, req: Any) -> float:
        return self.base_s + self.per_token_s * self.step_tokens

    def _served_in(self, reqs: Sequence[Any]) -> float:
        """Seconds until ``reqs`` (asked now) are generated: their own latency, or with a
        server capacity (``server_tok_s``, tokens/s over all requests), the time the server
        needs for everything asked before them and for them, first come first served."""
        latency = max((self._latency(r) for r in reqs), default=0.0)
        if self.server_tok_s <= 0:
            return latency
        now = time.monotonic()
        tokens = sum(r.n for r in reqs) * self.step_tokens
        self._free_at = max(self._free_at, now) + tokens / self.server_tok_s
        return max(latency, self._free_at - now)

    def backlog(self) -> int:
        """Sequences queued behind the running batch (``Generator.backlog``): with a capacity,
        the sequences of the work queued now, less the batch that capacity decodes at once
        (``server_tok_s * per_token_s`` sequences, each at its per-token pace); else 0."""
        if self.server_tok_s <= 0:
            return 0
        queued = (self._free_at - time.monotonic()) * self.server_tok_s / self.step_tokens
        return max(0, int(queued - self.server_tok_s * self.per_token_s))

    def _sleep(self, delay: float, req: Any = None) -> asyncio.Future[Any]:
        """Latency timers grouped per millisecond: one loop timer completes every request
        due in that millisecond (as a batching server's client gets a step's results
        together), instead of one timer per request. Adds at most 1 ms of latency. With
        ``req``, the future's result is the request's completions."""
        t0 = time.thread_time()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        due = loop.time() + delay
        if self.server_step_s > 0:  # the step that finishes the request returns it with the others
            due = math.ceil(due / self.server_step_s) * self.server_step_s
        key = (loop, int(due * 1000.0) + 1)
        due = self._due.get(key)
        if due is None:
            due = self._due[key] = []
            loop.call_at(key[1] / 1000.0, self._fire, key)
        due.append((fut, req))
        self.cpu_s += time.thread_time() - t0
        return fut

    def _fire(self, key: tuple[Any, int]) -> None:
        t0 = time.thread_time()
        for fut, req in self._due.pop(key):
            if not fut.done():
                fut.set_result(None if req is None else self._comps(req))
        self.cpu_s += time.thread_time() - t0

    def submit(self, req: Any, *, dedup: bool = False) -> asyncio.Future[list[Any]]:
        """``agenerate`` as a future (``Generator.submit``); ``--generator-api agenerate``
        hides it."""
        return self._sleep(self._served_in((req,)), req)

    async def agenerate(self, req: Any, *, dedup: bool = False) -> list[Any]:
        delay = self._served_in((req,))
        if delay > 0:
            await self._sleep(delay)
        else:
            await asyncio.sleep(0)
        return self._comps(req)

    def generate(self, reqs: list[Any], *, dedup: bool = False) -> list[list[Any]]:
        delay = self._served_in(reqs)
        if self.server_step_s > 0:
            now = time.monotonic()  # the event loop's clock too
            delay = math.ceil((now + delay) / self.server_step_s) * self.server_step_s - now
        time.sleep(delay)
        return [self._comps(r) for r in reqs]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Res:
    ok: bool
    observation: str
    status: str = "ok"


_OK = _Res(True, "1", "ok")
_ERR = _Res(False, "NameError: undefined", "error")


class InstantSandbox:
    """Code 'runs' instantly: a step fails iff it references ``undefined``. Same interface
    as ``rstar.sandbox.Sandbox``: ``submit`` (the async pipeline: a ``concurrent.futures``
    future, already done for a program seen before, as a cache hit is; otherwise finished by
    the sandbox's own thread, as the real pool's reader thread does, so the driver pays the
    same cross-thread wake-ups), ``arun`` (the async pipeline when ``submit=False``) and
    ``run_many`` (a whole lock-step batch, called in a worker thread). ``cpu_s`` is the
    stand-in's own CPU: the submit bodies, the thread's work and ``run_many``; the future
    callbacks the thread runs (the driver's countdowns) are the search's."""

    def __init__(self, submit: bool = True) -> None:
        self._caller_cpu_s = 0.0  # submit and run_many, in the caller's thread
        self._thread_cpu_s = 0.0  # the sandbox thread's own work
        self._seen: dict[str, _Res] = {}
        self._queue: list[tuple[concurrent.futures.Future[_Res], str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if not submit:  # the driver falls back to arun
            self.submit = self.submit_many = None  # type: ignore[assignment]

    @property
    def cpu_s(self) -> float:
        return self._caller_cpu_s + self._thread_cpu_s

    @staticmethod
    def _result(program: str) -> _Res:
        return _ERR if "undefined" in program else _OK

    def submit(self, program: str) -> concurrent.futures.Future[_Res]:
        return self.submit_many([program])[0]

    def submit_many(self, programs: Sequence[str]) -> list[concurrent.futures.Future[_Res]]:
        t0 = time.thread_time()
        out = []
        queued = []
        for program in programs:
            fut: concurrent.futures.Future[_Res] = concurrent.futures.Future()
            hit = self._seen.get(program)
            if hit is not None:
                fut.set_result(hit)
            else:
                queued.append((fut, program))
            out.append(fut)
        if queued:
            with self._cond:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._serve, daemon=True)
                    self._thread.start()
                self._queue += queued
                self._cond.notify()
        self._caller_cpu_s += time.thread_time() - t0
        return out

    def _serve(self) -> None:
        while True:
            t0 = time.thread_time()
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch, self._queue = self._queue, []
            done = []
            for fut, program in batch:
                res = self._seen[program] = self._result(program)
                done.append((fut, res))
            self._thread_cpu_s += time.thread_time() - t0
            for fut, res in done:
                fut.set_result(res)  # runs the driver's callbacks: search CPU

    async def arun(self, program: str) -> _Res:
        """As ``rstar.sandbox.Sandbox.arun``: the future of ``submit``, wrapped."""
        return await asyncio.wrap_future(InstantSandbox.submit_many(self, [program])[0])

    def run_many(self, programs: list[str]) -> list[_Res]:
        t0 = time.thread_time()
        out = [self._result(p) for p in programs]
        self._caller_cpu_s += time.thread_time() - t0
        return out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class StrGrader:
    def __init__(self) -> None:
        self.cpu_s = 0.0

    def grade_many(self, preds: list[str | None], golds: list[str]) -> list[bool]:
        t0 = time.thread_time()
        out = [p == g for p, g in zip(preds, golds)]
        self.cpu_s += time.thread_time() - t0
        return out

    def close(self) -> None:
        pass


class HashScorer:
    """A value in [-1, 1) from a hash of (prompt length, last token id)."""

    def __init__(self) -> None:
        self.cpu_s = 0.0

    def score(self, reqs: list[Any]) -> list[float]:
        t0 = time.thread_time()
        out = [((_mix(len(r.prompt_ids), r.prompt_ids[-1]) % 200) - 100) / 100.0 for r in reqs]
        self.cpu_s += time.thread_time() - t0
        return out

    def close(self) -> None:
        pass


@dataclass
class _P:
    id: str
    question: str
    answer: str


def run_once(pipeline: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = SearchConfig(mode="mcts", value=args.value, n=args.n, rollouts=args.rollouts, max_depth=args.depth,
                       error_threshold=1, pipeline=pipeline, concurrent_trees=args.trees,
                       turn_interval_ms=args.turn_interval_ms, busy_turn_interval_ms=args.busy_turn_interval_ms,
                       reference_engine=args.reference)
    problems = [_P(f"q{i}", f"Problem {i}: compute {i} mod 3.", str(i % 3)) for i in range(args.trees)]
    gen = LatencyGenerator(args.base_ms / 1000, args.per_token_ms / 1000, args.step_tokens, args.pad,
                           args.server_tok_s, args.server_step_ms / 1000)
    if args.generator_api == "agenerate":
        gen.submit = None  # type: ignore[assignment, method-assign]
    scorer = HashScorer() if args.value != "terminal" else None
    sandbox, grader = InstantSandbox(submit=args.sandbox_api == "submit"), StrGrader()
    s = Searcher(gen, scorer, cfg, sandbox=sandbox, grader=grader)
    out = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out = os.path.join(args.out, f"{pipeline}-{os.getpid()}-{time.time_ns()}.jsonl")
    c0, w0 = time.process_time(), time.perf_counter()
    try:
        res = s.run(problems, out, progress=False)
    finally:
        sandbox.close()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    stand = (gen.cpu_s + gen.tokenizer.cpu_s + (scorer.cpu_s if scorer is not None else 0.0) + grader.cpu_s
             + sandbox.cpu_s)
    nodes = sum(len(r.record["nodes"]) for r in res)
    return {"pipeline": pipeline, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "cpu_share": round(cpu / wall, 4), "standin_cpu_s": round(stand, 3),
            "search_cpu_s": round(cpu - stand, 3), "search_share": round((cpu - stand) / wall, 4),
            "loop_s": round(s.stats.loop_s, 3), "paused_s": round(s.stats.paused_s, 3),
            "tokens_per_s": round(s.stats.tokens / wall, 1), "problems_per_s": round(len(res) / wall, 2),
            "nodes": nodes, "expansions": s.stats.expansions, "engine": type(s.forest).__name__,
            "loadavg": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", type=int, default=1000)
    p.add_argument("--rollouts", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--value", default="ppm", choices=("terminal", "ppm_init", "ppm"))
    p.add_argument("--base-ms", type=float, default=200.0, help="per-request latency")
    p.add_argument("--per-token-ms", type=float, default=10.0, help="per generated token (decode step)")
    p.add_argument("--step-tokens", type=int, default=64)
    p.add_argument("--server-tok-s", type=float, default=0.0,
                   help="the server's capacity in generated tokens/s over all requests (0: unlimited)")
    p.add_argument("--server-step-ms", type=float, default=0.0,
                   help="deliver results at engine-step boundaries of this length, as VLLMGenerator "
                        "does (all requests finished in one step come back together; 0: each on its own)")
    p.add_argument("--generator-api", default="submit", choices=("submit", "agenerate"),
                   help="how the async pipeline waits for generations: futures or a task per request")
    p.add_argument("--turn-interval-ms", type=float, default=0.0,
                   help="SearchConfig.turn_interval_ms of the async pipeline")
    p.add_argument("--busy-turn-interval-ms", type=float, default=SearchConfig.busy_turn_interval_ms,
                   help="SearchConfig.busy_turn_interval_ms of the async pipeline (0: never paced)")
    p.add_argument("--pad", default="code", choices=sorted(PADS), help="step body filler (see PADS)")
    p.add_argument("--sandbox-api", default="submit", choices=("submit", "arun"),
                   help="how the async pipeline runs code: futures (rstar.sandbox.Sandbox) or coroutines")
    p.add_argument("--repeat", type=int, default=1, help="runs per pipeline (alternating); medians reported")
    p.add_argument("--reference", action="store_true", help="pure-Python engine (when _core is not built)")
    p.add_argument("--out", default=None, help="also write the JSONL records (with fsync) into this directory")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for _ in range(args.repeat):
        rows += [run_once("async", args), run_once("lockstep", args)]
    print(f"{'pipeline':<9} {'wall s':>7} {'cpu s':>6} {'cpu %':>6} {'stand-in s':>10} {'search s':>8} "  # noqa: T201
          f"{'search %':>8} {'paused s':>8} {'tok/s':>7} {'prob/s':>6} {'nodes':>6} {'load':>5}")
    for r in rows:
        print(f"{r['pipeline']:<9} {r['wall_s']:>7.2f} {r['cpu_s']:>6.3f} {100 * r['cpu_share']:>5.2f}% "  # noqa: T201
              f"{r['standin_cpu_s']:>10.3f} {r['search_cpu_s']:>8.3f} {100 * r['search_share']:>7.2f}% "
              f"{r['paused_s']:>8.2f} {r['tokens_per_s']:>7.0f} {r['problems_per_s']:>6.1f} {r['nodes']:>6} {r['loadavg']:>5.2f}")
    med = {pl: {k: statistics.median(r[k] for r in rows if r["pipeline"] == pl)
                for k in ("wall_s", "cpu_share", "search_share")} for pl in ("async", "lockstep")}
    print(f"engine: {rows[0]['engine']}; medians: search % async {100 * med['async']['search_share']:.2f}, "  # noqa: T201
          f"lockstep {100 * med['lockstep']['search_share']:.2f}; "
          f"async speed-up {med['lockstep']['wall_s'] / med['async']['wall_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
