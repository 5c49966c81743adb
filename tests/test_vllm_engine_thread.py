"""The thread that steps VLLMGenerator's engine, against a fake ``LLMEngine`` (no vLLM needed).

What it must do: deliver each engine step's finished requests to an event loop in one
hand-off, resolve blocking callers' futures directly, abort the requests of cancelled futures,
fail only the request whose ``add_request`` fails, fail everything (and every later request)
when a step fails, and fail what is still running when it is closed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from rstar.backends.vllm_backend import _EngineThread, _Sink


@dataclass
class FakeEngine:
    """``LLMEngine``'s surface: a request finishes after ``params.steps`` steps with one
    completion, ``"<rid>"`` + the stop string."""

    step_s: float = 0.002
    fail_add: set[str] = field(default_factory=set)  # prompts whose add_request raises
    fail_step_at: int | None = None
    running: dict[str, list] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    steps: int = 0
    finishing_steps: int = 0  # steps that returned at least one finished request
    thread: set[str] = field(default_factory=set)
    step_sizes: list[int] = field(default_factory=list)  # requests running at each step

    def add_request(self, rid: str, prompt: str, params: SimpleNamespace) -> str:
        self.thread.add(threading.current_thread().name)
        if prompt in self.fail_add:
            raise ValueError(f"bad prompt {prompt!r}")
        self.running[rid] = [params.steps, prompt, getattr(params, "n", 1)]
        return rid

    def abort_request(self, rids: list[str]) -> None:
        self.thread.add(threading.current_thread().name)
        for rid in rids:
            if self.running.pop(rid, None) is not None:
                self.aborted.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def get_num_unfinished_requests(self) -> int:
        return sum(st[2] for st in self.running.values())  # sequences: vLLM counts each of n

    def step(self) -> list[SimpleNamespace]:
        self.thread.add(threading.current_thread().name)
        self.steps += 1
        self.step_sizes.append(len(self.running))
        if self.fail_step_at is not None and self.steps >= self.fail_step_at:
            raise RuntimeError("engine core died")
        time.sleep(self.step_s)
        outs = []
        for rid, st in list(self.running.items()):
            st[0] -= 1
            if st[0] <= 0:
                del self.running[rid]
                comp = SimpleNamespace(index=0, text=f"{st[1]}<end_of_step>", token_ids=[1, 2],
                                       finish_reason="stop", stop_reason="<end_of_step>")
                outs.append(SimpleNamespace(request_id=rid, finished=True, outputs=[comp]))
            else:
                outs.append(SimpleNamespace(request_id=rid, finished=False, outputs=[]))
        self.finishing_steps += any(o.finished for o in outs)
        return outs


def _params(steps: int) -> SimpleNamespace:
    return SimpleNamespace(steps=steps)


def _add_blocking(et: _EngineThread, prompt: str, steps: int, dedup: bool = False) -> concurrent.futures.Future:
    """Queue a request as a blocking caller does (``generate``): a ``concurrent.futures``
    future, resolved in the engine thread."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    et.add(prompt, _params(steps), _Sink(fut, None, dedup))
    return fut


@pytest.fixture
def engine_thread():
    made: list[_EngineThread] = []

    def make(engine: FakeEngine) -> _EngineThread:
        et = _EngineThread(engine, tokenizer=None)
        made.append(et)
        return et

    yield make
    for et in made:
        et.close()


def test_each_step_reaches_the_loop_in_one_handoff(engine_thread) -> None:
    engine = FakeEngine()
    et = engine_thread(engine)
    handoffs = []

    async def run() -> list:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(cb, *args):  # type: ignore[no-untyped-def]
            handoffs.append(len(args[0]) if args else 0)
            return real(cb, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        futs = []
        for k in range(40):
            fut = loop.create_future()
            et.add(f"p{k}", _params(1 + k % 4), _Sink(fut, loop, False))
            futs.append(fut)
        return await asyncio.gather(*futs)

    results = asyncio.run(run())
    assert [r[0].text for r in results] == [f"p{k}<end_of_step>" for k in range(40)]
    assert all(r[0].stop == "<end_of_step>" and r[0].finish_reason == "stop" for r in results)
    assert sum(handoffs) == 40
    assert len(handoffs) == engine.finishing_steps < 40  # one hand-off per step that finished any
    assert engine.thread == {"rstar-vllm-engine"}  # the engine is only touched by its thread


def test_a_batch_is_admitted_before_the_next_step(engine_thread) -> None:
    """``add_many`` (what ``generate`` uses): the engine takes the whole batch, then steps."""
    engine = FakeEngine()
    et = engine_thread(engine)
    inbox = et._inbox

    class SlowInbox:  # a caller preparing the next request: the engine thread wakes meanwhile
        get, get_nowait = inbox.get, inbox.get_nowait

        def put(self, item):  # type: ignore[no-untyped-def]
            inbox.put(item)
            time.sleep(0.002)

    et._inbox = SlowInbox()  # type: ignore[assignment]
    futs = [concurrent.futures.Future() for _ in range(50)]
    et.add_many([(f"b{k}", _params(2), _Sink(f, None, False)) for k, f in enumerate(futs)])
    assert [f.result(timeout=10)[0].text for f in futs] == [f"b{k}<end_of_step>" for k in range(50)]
    assert engine.step_sizes == [50, 50]


def test_backlog_counts_sequences_beyond_max_num_seqs(engine_thread) -> None:
    """``backlog()``: the sequences (requests x n) in the engine beyond its ``max_num_seqs``,
    as the engine counts them after each step; finished and aborted requests leave it; 0 when
    the engine does not say its limit."""
    engine = FakeEngine(step_s=0.001)
    engine.vllm_config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=5))  # type: ignore[attr-defined]
    et = engine_thread(engine)
    futs = [concurrent.futures.Future() for _ in range(4)]
    et.add_many([(f"s{k}", SimpleNamespace(steps=10**6 if k < 2 else 200, n=3), _Sink(f, None, False))
                 for k, f in enumerate(futs)])

    def wait_for(value: int) -> None:
        deadline = time.monotonic() + 10
        while et.backlog() != value and time.monotonic() < deadline:
            time.sleep(0.002)
        assert et.backlog() == value

    wait_for(4 * 3 - 5)
    assert [f.result(timeout=10)[0].text for f in futs[2:]] == ["s2<end_of_step>", "s3<end_of_step>"]
    wait_for(1)  # 6 sequences left, the limit is 5
    assert et._live_seqs == 6
    et.abort("rstar-0")
    deadline = time.monotonic() + 10
    while et._live_seqs != 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert et._live_seqs == 3 and et.backlog() == 0
    assert engine_thread(FakeEngine()).backlog() == 0  # no vllm_config: no limit known


def test_blocking_callers_and_dedup(engine_thread) -> None:
    engine = FakeEngine()
    et = engine_thread(engine)
    futs = [_add_blocking(et, f"q{k}", 2, dedup=True) for k in range(5)]
    assert [f.result(timeout=10)[0].text for f in futs] == [f"q{k}<end_of_step>" for k in range(5)]


def test_cancelled_future_aborts_its_request(engine_thread) -> None:
    engine = FakeEngine()
    et = engine_thread(engine)
    et.ABORT_SCAN_S = 0.02

    async def run() -> tuple[str, list]:
        loop = asyncio.get_running_loop()
        long_fut, short_fut = loop.create_future(), loop.create_future()
        long_rid = et.add("long", _params(10**6), _Sink(long_fut, loop, False))
        et.add("short", _params(3), _Sink(short_fut, loop, False))
        await asyncio.sleep(0.05)
        long_fut.cancel()
        return long_rid, await short_fut

    long_rid, short = asyncio.run(run())
    assert short[0].text == "short<end_of_step>"
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.aborted == [long_rid] and not engine.running


def test_explicit_abort(engine_thread) -> None:
    engine = FakeEngine()
    et = engine_thread(engine)
    rid = et.add("long", _params(10**6), _Sink(concurrent.futures.Future(), None, False))
    et.abort(rid)
    deadline = time.monotonic() + 10
    while rid not in engine.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.aborted == [rid]


def test_a_failing_request_fails_alone(engine_thread) -> None:
    engine = FakeEngine(fail_add={"bad"})
    et = engine_thread(engine)
    bad, good = _add_blocking(et, "bad", 1), _add_blocking(et, "good", 1)
    with pytest.raises(ValueError, match="bad prompt"):
        bad.result(timeout=10)
    assert good.result(timeout=10)[0].text == "good<end_of_step>"


def test_a_failing_step_fails_every_request_and_later_ones(engine_thread) -> None:
    engine = FakeEngine(fail_step_at=3)
    et = engine_thread(engine)

    async def run() -> list:
        loop = asyncio.get_running_loop()
        futs = []
        for k in range(6):
            fut = loop.create_future()
            et.add(f"p{k}", _params(50), _Sink(fut, loop, False))
            futs.append(fut)
        return await asyncio.gather(*futs, return_exceptions=True)

    res = asyncio.run(run())
    assert all(isinstance(r, RuntimeError) and "engine core died" in str(r) for r in res)
    with pytest.raises(RuntimeError, match="failed earlier"):
        _add_blocking(et, "later", 1)


def test_close_fails_what_is_still_running(engine_thread) -> None:
    engine = FakeEngine()
    et = engine_thread(engine)
    futs = [_add_blocking(et, f"p{k}", 10**6) for k in range(3)]
    time.sleep(0.05)
    et.close()
    for f in futs:
        with pytest.raises(RuntimeError, match="closed"):
            f.result(timeout=10)
    assert sorted(engine.aborted) == sorted(f"rstar-{k}" for k in range(3))
    with pytest.raises(RuntimeError, match="closed"):
        _add_blocking(et, "after", 1)


def test_a_request_queued_behind_close_fails_too(engine_thread) -> None:
    """A request another thread queues just after ``close`` queued its sentinel, taken from
    the queue in the same drain, is failed, not left waiting forever."""
    engine = FakeEngine(step_s=0.2)
    et = engine_thread(engine)
    running = _add_blocking(et, "running", 10**6)
    time.sleep(0.05)  # the engine thread is inside a step now
    et._inbox.put(None)  # what close() queues, without close()'s flag: the racing add passes
    late = _add_blocking(et, "late", 1)
    for f in (running, late):
        with pytest.raises(RuntimeError, match="closed"):
            f.result(timeout=10)
