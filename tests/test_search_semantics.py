"""Exact official MCTS semantics, beam/best-of-N/greedy behaviour, resume, with scripted
test doubles (no model): the engine-driven search must build the same trees as a plain
sequential transcription of the official solver."""

from __future__ import annotations

import json
import math

import pytest

from search_fakes import (
    FakeGrader,
    FakeSandbox,
    FakeScorer,
    Problem,
    ScriptedGenerator,
    official_mcts,
    ppm_of,
)
from rstar.search.config import SearchConfig, load_search_config
from rstar.search.driver import Searcher, _Pacer
from rstar.search.prompts import build_prompt

QUESTIONS = [Problem(f"p{i}", f"What is question number {i}?", str(i % 3)) for i in range(12)]


def run(cfg: SearchConfig, problems=QUESTIONS, *, scorer=None, gen=None, out=None, sandbox=None):
    gen = gen or ScriptedGenerator()
    with Searcher(gen, scorer, cfg, sandbox=sandbox or FakeSandbox(), grader=FakeGrader()) as s:
        return s.run(problems, out, progress=False), s


def mcts_cfg(**kw) -> SearchConfig:
    base = dict(mode="mcts", value="terminal", n=4, rollouts=6, max_depth=5, error_threshold=2,
                reference_engine=True)
    base.update(kw)
    return SearchConfig(**base)


def check_tree(rec: dict) -> None:
    """Parents precede children, depths consistent, Q = mean of what was added, terminal
    answers extracted."""
    nodes = rec["nodes"]
    assert nodes[0]["parent"] == -1 and nodes[0]["depth"] == 0
    for i, n in enumerate(nodes[1:], 1):
        assert 0 <= n["parent"] < i
        assert n["depth"] == nodes[n["parent"]]["depth"] + 1
        if n["kind"] == "answer" and n["valid"]:
            assert n["answer"] is not None and n["terminal"]
        if not n["valid"]:
            assert n["terminal"]
    # value bookkeeping: W(node) = own init + own invalid value + sum of terminal backups below
    sums = [0.0] * len(nodes)
    cnt = [0] * len(nodes)
    for i, n in enumerate(nodes):
        if i == 0:
            continue
        if not n["valid"]:
            sums[i] += -1.0
            cnt[i] += 1
            continue
        if n["value"] is not None and not (n["terminal"] and rec["mode"] == "mcts"):
            sums[i] += n["value"]
            cnt[i] += 1
        if n["terminal"] and n["reward"] is not None:
            j = i
            while j != -1:
                sums[j] += n["reward"]
                cnt[j] += 1
                j = nodes[j]["parent"]
    for i, n in enumerate(nodes):
        assert n["visits"] == cnt[i], (i, n)
        expect = sums[i] / cnt[i] if cnt[i] else 0.0
        assert math.isclose(n["q"], expect, abs_tol=1e-6), (i, n["q"], expect)


def reference_tree(p: Problem, cfg: SearchConfig):
    return official_mcts(p.question, p.answer, ScriptedGenerator(), n=cfg.n, rollouts=cfg.rollouts,
                         max_depth=cfg.max_depth, threshold=cfg.error_threshold, value=cfg.value,
                         collapse=cfg.answer_collapse, dedup=cfg.dedup)


def assert_same_as_official(rec: dict, ref) -> None:
    nodes = rec["nodes"]
    assert len(nodes) == len(ref), (len(nodes), len(ref))
    for n, r in zip(nodes, ref):
        assert n["text"] == r.text
        assert n["parent"] == (r.parent.order if r.parent is not None and r.parent.order >= 0 else (0 if r.parent else -1))
        assert n["visits"] == r.N, (n, r.N)
        assert math.isclose(n["q"], r.q(), abs_tol=1e-6)
        assert n["valid"] == r.valid


@pytest.mark.parametrize("value", ["terminal", "ppm_init", "ppm"])
@pytest.mark.parametrize("pipeline", ["async", "lockstep"])
def test_mcts_matches_official(value: str, pipeline: str) -> None:
    cfg = mcts_cfg(value=value, pipeline=pipeline)
    results, s = run(cfg, scorer=FakeScorer() if value != "terminal" else None)
    for p, res in zip(QUESTIONS, results):
        rec = res.record
        check_tree(rec)
        ref = reference_tree(p, cfg)
        for i, r in enumerate(ref):
            r.order = i
        assert_same_as_official(rec, ref)


def test_mcts_semantics_hand_checked() -> None:
    """A scripted tree: duplicates dropped, answer collapse, error threshold, depth limit."""
    script = {
        0: ["<code>\nx = 2 + 2\n<end_of_step>", "<code>\nx = 1/0\n<end_of_step>", "<code>\nx = 2 + 2\n<end_of_step>"],
    }

    def policy(question, steps, i, req):
        d = len(steps)
        if d == 0:
            return script[0][i]
        if "1/0" in steps[0]:
            return "\nprint(x)\n<end_of_code>"  # fails again: 2 consecutive errors -> invalid
        if d == 1:
            return ["\nprint(x)\n<end_of_code>", "\n<answer>\\boxed{4}\n<end_of_answer>", "\nprint(x)\n<end_of_code>"][i]
        return ["\n<answer>\\boxed{5}\n<end_of_answer>", "\n<answer>\\boxed{4}\n<end_of_answer>", "\nq=1\n<end_of_step>"][i]

    cfg = mcts_cfg(n=3, rollouts=4, max_depth=4, error_threshold=2)
    (res,), _ = run(cfg, [Problem("a", "Q?", "4")], gen=ScriptedGenerator(policy))
    rec = res.record
    check_tree(rec)
    nodes = rec["nodes"]
    # root: 2 children (the duplicate dropped)
    assert [n["parent"] for n in nodes[1:3]] == [0, 0]
    assert nodes[1]["exec_ok"] is True and nodes[2]["exec_ok"] is False and nodes[2]["errors"] == 1
    assert not nodes[2]["terminal"]  # below the threshold: may still be repaired
    kids_of_1 = [n for n in nodes if n["parent"] == 1]
    # answer collapse: the answer sample stopped on <end_of_answer> -> only it is kept
    assert len(kids_of_1) == 1 and kids_of_1[0]["answer"] == "4" and kids_of_1[0]["correct"] is True
    assert kids_of_1[0]["reward"] == 1.0
    kids_of_2 = [n for n in nodes if n["parent"] == 2]
    assert kids_of_2 and all(not n["valid"] and n["reason"] == "errors" for n in kids_of_2)
    assert all("<output>" in n["text"] for n in kids_of_2)
    assert all(n["visits"] == 1 and n["q"] == -1.0 for n in kids_of_2)  # -1 on itself, no backup
    assert rec["chosen"]["answer"] == "4" and rec["chosen"]["correct"] is True


@pytest.mark.parametrize("rollouts", [1, 2, 5])
def test_depth_limit_and_lazy_close(rollouts: int) -> None:
    def policy(question, steps, i, req):
        return f"\nx{len(steps)}_{i} = {i}\n<end_of_step>"

    cfg = mcts_cfg(n=1, rollouts=rollouts, max_depth=3, error_threshold=1)
    (res,), s = run(cfg, [Problem("d", "Deep?", "1")], gen=ScriptedGenerator(policy))
    nodes = res.record["nodes"]
    # the official step loop: the first rollout stops before expanding depth max_depth
    assert max(n["depth"] for n in nodes) == (3 if rollouts == 1 else 4)
    deep = [n for n in nodes if n["depth"] == 4]
    assert all(not n["valid"] and n["reason"] == "depth" for n in deep)
    ref = official_mcts("Deep?", "1", ScriptedGenerator(policy), n=1, rollouts=rollouts, max_depth=3, threshold=1,
                        value="terminal")
    for i, r in enumerate(ref):
        r.order = i
    assert_same_as_official(res.record, ref)
    check_tree(res.record)


@pytest.mark.parametrize("k", [2, 4])
def test_many_leaves_per_tree(k: int) -> None:
    cfg = mcts_cfg(leaves_per_tree=k, rollouts=8)
    results, s = run(cfg)
    for res in results:
        check_tree(res.record)
        assert res.record["stats"]["rollouts"] <= 8
    assert s.forest.memory_stats()["tickets_open"] == 0


def test_turn_interval_batches_turns_and_keeps_the_official_trees() -> None:
    """turn_interval_ms only delays the async loop's turns (more finished work per turn): the
    trees stay the official ones, and a search of several turns takes the pauses."""
    cfg = mcts_cfg(value="ppm", pipeline="async", turn_interval_ms=20.0)
    results, s = run(cfg, scorer=FakeScorer())
    for p, res in zip(QUESTIONS, results):
        ref = reference_tree(p, cfg)
        for i, r in enumerate(ref):
            r.order = i
        assert_same_as_official(res.record, ref)
    assert s.stats.commits >= 2 and s.stats.wall_s >= 0.02 * (s.stats.commits - 1)
    with pytest.raises(ValueError, match="turn_interval_ms"):
        mcts_cfg(turn_interval_ms=-1.0)


def test_pacer_waits_only_while_the_generator_has_a_backlog_and_not_past_half_of_it() -> None:
    """busy_turn_interval_ms: the pause is the busy cap while the backlog lasts long at the
    measured rate, half the backlog's duration when that is shorter, and nothing without a
    backlog, a rate, or a generator that reports one."""
    queued = [100]
    p = _Pacer(0.0, 0.1, lambda: queued[0])
    assert p.pause(0.0) == 0.0  # no rate measured yet
    p.done = 50
    assert p.pause(0.1) == pytest.approx(0.1)  # 500 sequences/s: 100 queued last 0.2 s
    queued[0] = 20  # 0.04 s of work queued: wait at most half of it
    assert p.pause(0.12) == pytest.approx(0.02)
    queued[0] = 0
    assert p.pause(0.13) == 0.0
    assert _Pacer(0.01, 0.1, None).pause(1.0) == 0.01  # no backlog(): turn_interval_ms only
    q = _Pacer(0.0, 0.0, lambda: 10**6)  # busy_turn_interval_ms=0: never paced
    q.pause(0.0)
    q.done = 10
    assert q.pause(1.0) == 0.0


class BacklogGenerator(ScriptedGenerator):
    """A generator whose server always has (or never has) sequences queued."""

    def __init__(self, queued: int) -> None:
        super().__init__(latency_s=0.005)
        self.queued = queued
        self.asked = 0

    def backlog(self) -> int:
        self.asked += 1
        return self.queued


@pytest.mark.parametrize("queued", [0, 10**6])
def test_busy_generator_paces_the_async_loop_and_keeps_the_official_trees(queued: int) -> None:
    """While the generator reports a backlog, the async loop pauses between turns (the
    paced time is counted); the trees are the official ones either way."""
    cfg = mcts_cfg(value="ppm", pipeline="async", busy_turn_interval_ms=20.0)
    gen = BacklogGenerator(queued)
    results, s = run(cfg, scorer=FakeScorer(), gen=gen)
    for p, res in zip(QUESTIONS, results):
        ref = reference_tree(p, cfg)
        for i, r in enumerate(ref):
            r.order = i
        assert_same_as_official(res.record, ref)
    assert gen.asked > 0
    if queued:
        assert s.stats.paused_s > 0.02
    else:
        assert s.stats.paused_s == 0.0
    with pytest.raises(ValueError, match="busy_turn_interval_ms"):
        mcts_cfg(busy_turn_interval_ms=float("nan"))


@pytest.mark.parametrize("pipeline", ["async", "lockstep"])
def test_on_record_sees_each_problem_once_after_its_line_is_written(tmp_path, pipeline: str) -> None:
    out = tmp_path / "trees.jsonl"
    seen: list[tuple[str, int]] = []

    def on_record(rec: dict) -> None:  # the record is already in the file when we get it
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
        seen.append((rec["id"], ids.count(rec["id"])))

    cfg = mcts_cfg(pipeline=pipeline)
    with Searcher(ScriptedGenerator(), None, cfg, sandbox=FakeSandbox(), grader=FakeGrader(),
                  on_record=on_record) as s:
        results = s.run(QUESTIONS, out, progress=False)
    assert sorted(seen) == sorted((r.id, 1) for r in results)


def test_lockstep_deterministic_and_equal_to_async() -> None:
    cfg_l = mcts_cfg(pipeline="lockstep", value="ppm")
    a, _ = run(cfg_l, scorer=FakeScorer())
    b, _ = run(cfg_l, scorer=FakeScorer())
    c, _ = run(mcts_cfg(pipeline="async", value="ppm"), scorer=FakeScorer())
    strip = lambda r: [{k: v for k, v in n.items()} for n in r.record["nodes"]]  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b] == [strip(r) for r in c]


def test_beam_children_attached_to_their_parents() -> None:
    """Each child's text names the parent prompt it was generated from; finished answers
    enter the ranking (the case the official code gets wrong)."""

    def policy(question, steps, i, req):
        d = len(steps)
        tag = f"#{d}.{len(''.join(steps))}.{i}"
        if d >= 1 and i == 0 and d % 2 == 1:
            return f"\n<answer>{tag} \\boxed{{{d}}}\n<end_of_answer>"
        return f"\nv{d}_{i} = {i} {tag}\n<end_of_step>"

    cfg = SearchConfig(mode="beam", value="ppm", n=3, beam_width=3, max_depth=6, error_threshold=1,
                       answer_collapse=False, reference_engine=True)
    (res,), _ = run(cfg, [Problem("b", "Beam?", "1")], gen=ScriptedGenerator(policy), scorer=FakeScorer())
    nodes = res.record["nodes"]
    for n in nodes[1:]:
        par = nodes[n["parent"]]
        prefix_len = 0
        j = n["parent"]
        while j > 0:
            prefix_len += len(nodes[j]["text"])
            j = nodes[j]["parent"]
        assert f"#{par['depth']}.{prefix_len}." in n["text"], (n["text"], par["text"])
        if n["value"] is not None:  # Q = PPM value of the step
            path = []
            j = n["id"]
            while j > 0:
                path.append(nodes[j]["text"])
                j = nodes[j]["parent"]
            assert math.isclose(n["value"], ppm_of(build_prompt("Beam?", "".join(reversed(path)))))
    finished = [n for n in nodes if n["terminal"] and n["valid"]]
    assert len(finished) >= 2
    best = max(res.record["answers"], key=lambda a: a["ppm"])
    assert res.record["chosen"]["node"] == best["node"]
    # terminal nodes never hold a beam slot: no child of a terminal node
    assert not any(nodes[n["parent"]]["terminal"] for n in nodes[1:])


def test_best_of_n_and_greedy() -> None:
    cfg = SearchConfig(mode="best_of_n", value="ppm", n=5, vote="ppm", max_depth=6, error_threshold=1,
                       dedup=False, answer_collapse=False, reference_engine=True)
    results, _ = run(cfg, scorer=FakeScorer())
    for res in results:
        rec = res.record
        check_tree(rec)
        roots_kids = [n for n in rec["nodes"] if n["parent"] == 0]
        assert len(roots_kids) == 5
        for n in rec["nodes"][1:]:  # chains: every non-root node has at most one child
            assert sum(1 for m in rec["nodes"] if m["parent"] == n["id"]) <= 1
        if rec["answers"]:
            best = max(rec["answers"], key=lambda a: a["ppm"])
            assert rec["chosen"]["node"] == best["node"]
    g = load_search_config("eval_greedy", ["reference_engine=true"])
    results, s = run(g)
    for res in results:
        assert sum(1 for n in res.record["nodes"] if n["parent"] == 0) == 1
        assert max(n["depth"] for n in res.record["nodes"]) <= 3
    assert all(r.temperature == 0.0 for r in s.gen.requests)


def test_resume_skips_finished(tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    cfg = mcts_cfg()
    first, _ = run(cfg, QUESTIONS[:5], out=out)
    # a torn last line (a kill mid-write) is dropped and that problem redone
    with open(out, "ab") as f:
        f.write(b'{"id": "p5", "nod')
    gen = ScriptedGenerator()
    allres, _ = run(cfg, QUESTIONS, out=out, gen=gen)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(p.id for p in QUESTIONS)
    assert [r.id for r in allres] == [p.id for p in QUESTIONS]
    asked = {gen.tokenizer.decode(r.prompt_ids).split("\n")[1] for r in gen.requests}
    assert asked == {p.question for p in QUESTIONS[5:]}
    assert allres[0].record == first[0].record


# --------------------------------------------------------------------------- driver internals
class SuspendingSandbox(FakeSandbox):
    """Code runs after real suspensions (a timer and a bare yield), as a pooled sandbox's
    ``arun`` does: the driver's eager start hands these to tasks."""

    async def arun(self, program: str):
        import asyncio

        await asyncio.sleep(0.001)
        await asyncio.sleep(0)
        return self.run(program)


@pytest.mark.parametrize("pipeline", ["async", "lockstep"])
def test_mcts_matches_official_with_suspending_sandbox(pipeline: str) -> None:
    cfg = mcts_cfg(value="ppm_init", pipeline=pipeline)
    results, _ = run(cfg, QUESTIONS[:6], scorer=FakeScorer(), sandbox=SuspendingSandbox())
    _assert_trees_are_official(cfg, QUESTIONS[:6], results)


def _assert_trees_are_official(cfg: SearchConfig, problems, results) -> None:
    for p, res in zip(problems, results, strict=True):
        check_tree(res.record)
        ref = reference_tree(p, cfg)
        for i, r in enumerate(ref):
            r.order = i
        assert_same_as_official(res.record, ref)


class FuturesSandbox(FakeSandbox):
    """``submit`` returns ``concurrent.futures`` futures, as ``rstar.sandbox.Sandbox`` does:
    a repeated program is already done (a cache hit); a new one finishes later in another
    thread, in an order unrelated to submission."""

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__()
        import concurrent.futures

        self._pool = concurrent.futures.ThreadPoolExecutor(3)
        self._seen: dict[str, object] = {}
        self.fail_on = fail_on
        self.submitted = 0

    def submit(self, program: str):
        import concurrent.futures
        import random
        import time

        self.submitted += 1
        if program in self._seen:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_result(self._seen[program])
            return fut

        def work():
            time.sleep(random.random() * 0.002)
            if self.fail_on is not None and self.fail_on in program:
                raise OSError("sandbox pool lost")
            res = self.run(program)
            self._seen[program] = res
            return res

        return self._pool.submit(work)

    async def arun(self, program: str):
        raise AssertionError("the async pipeline must use submit when the sandbox has it")

    def close(self) -> None:
        self._pool.shutdown()


@pytest.mark.parametrize("value", ["terminal", "ppm_init"])
def test_mcts_matches_official_with_futures_sandbox(value: str) -> None:
    cfg = mcts_cfg(value=value, pipeline="async")
    sandbox = FuturesSandbox()
    try:
        results, _ = run(cfg, QUESTIONS[:6], scorer=FakeScorer(), sandbox=sandbox)
    finally:
        sandbox.close()
    assert sandbox.submitted > 0
    _assert_trees_are_official(cfg, QUESTIONS[:6], results)


def test_failed_sandbox_future_reaches_the_caller() -> None:
    sandbox = FuturesSandbox(fail_on="=")
    try:
        with pytest.raises(OSError, match="sandbox pool lost"):
            run(mcts_cfg(value="terminal", pipeline="async"), QUESTIONS[:3], sandbox=sandbox)
    finally:
        sandbox.close()


class FuturesGenerator(ScriptedGenerator):
    """``submit`` returns an asyncio future (``Generator.submit``, as ``HFGenerator`` has),
    finished later by a loop callback, out of submission order; ``agenerate`` must not be
    used. ``fail_after``: the n-th request fails."""

    def __init__(self, fail_after: int | None = None, cancel: bool = False) -> None:
        super().__init__()
        self.fail_after = fail_after
        self.cancel = cancel
        self.submitted = 0

    def submit(self, request, *, dedup: bool = False):
        import asyncio

        self.submitted += 1
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fail = self.fail_after is not None and self.submitted >= self.fail_after

        def finish() -> None:
            if fut.done():
                return
            if fail and self.cancel:
                fut.cancel()
            elif fail:
                fut.set_exception(RuntimeError("generation server gone"))
            else:
                fut.set_result(self._one(request))

        loop.call_later((self.submitted * 7919 % 13) / 1000.0, finish)
        return fut

    async def agenerate(self, request, *, dedup: bool = False):
        raise AssertionError("the async pipeline must use submit when the generator has it")


@pytest.mark.parametrize("value", ["terminal", "ppm"])
def test_mcts_matches_official_with_futures_generator(value: str) -> None:
    gen = FuturesGenerator()
    cfg = mcts_cfg(value=value, pipeline="async")
    results, _ = run(cfg, gen=gen, scorer=FakeScorer() if value != "terminal" else None)
    assert gen.submitted > len(QUESTIONS)
    for p, res in zip(QUESTIONS, results):
        check_tree(res.record)
        ref = reference_tree(p, cfg)
        for i, r in enumerate(ref):
            r.order = i
        assert_same_as_official(res.record, ref)


def test_failed_generator_future_reaches_the_caller() -> None:
    with pytest.raises(RuntimeError, match="generation server gone"):
        run(mcts_cfg(value="terminal", pipeline="async"), QUESTIONS[:3], gen=FuturesGenerator(fail_after=5))
    import asyncio

    with pytest.raises(asyncio.CancelledError, match="cancelled"):  # never a stall
        run(mcts_cfg(value="terminal", pipeline="async"), QUESTIONS[:3],
            gen=FuturesGenerator(fail_after=5, cancel=True))


def test_normalise_program_is_the_line_rule() -> None:
    """The program normaliser = drop blank lines (``strip()`` empty) at both ends of
    ``split("\\n")``, join, one final newline; checked on random strings."""
    import random

    from rstar.search.steps import normalise_program

    def by_lines(program: str) -> str:
        lines = program.split("\n")
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        return "\n".join(lines) + ("\n" if lines else "")

    alphabet = ["\n", " ", "\t", "\r", "\x0b", "\x1c", "\u2028", "a", "#", "x = 1", "\n\n", "  \n"]
    rnd = random.Random(0)
    for _ in range(50_000):
        s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12)))
        assert normalise_program(s) == by_lines(s), repr(s)


def test_classify_step_agrees_with_parse_step() -> None:
    from rstar.search.steps import classify_step, parse_step

    texts = ["\nx = 1\n<end_of_step>", "\nprint(1)\n<end_of_code>", "\n<answer>so \\boxed{3}\n<end_of_answer>",
             "\n<answer>none\n<end_of_answer>", "\nx = 1", "<code>\ny = 2\n<end_of_code>\n<output>2<end_of_output>",
             "\nz = 3\n<end_of_output>", "\\boxed{4}"]
    for text in texts:
        for stop in (None, "<end_of_step>", "<end_of_code>", "<end_of_answer>", "<end_of_output>"):
            p = parse_step(text, stop)
            assert classify_step(text, stop) == (p.kind, p.closes_block, p.answer)


@pytest.mark.parametrize("pipeline", ["async", "lockstep"])
def test_scorer_error_reaches_the_caller(pipeline: str) -> None:
    class Boom(FakeScorer):
        def score(self, requests):
            raise RuntimeError("scorer down")

    with pytest.raises(RuntimeError, match="scorer down"):
        run(mcts_cfg(value="ppm", pipeline=pipeline), QUESTIONS[:3], scorer=Boom())


def test_gc_threshold_raised_while_searching_then_restored() -> None:
    import gc

    seen: list[int] = []

    class Watch(FakeSandbox):
        def run(self, program):
            seen.append(gc.get_threshold()[0])
            return super().run(program)

    before = gc.get_threshold()
    run(mcts_cfg(), QUESTIONS[:2], sandbox=Watch())
    assert gc.get_threshold() == before
    raised = before[0] if before[0] == 0 or before[0] >= Searcher.gc_threshold else Searcher.gc_threshold
    assert seen and set(seen) == {raised}


def test_result_writer_appends_batches_and_cuts_a_torn_line(tmp_path) -> None:
    from rstar.search.driver import ResultWriter

    path = tmp_path / "o.jsonl"
    w = ResultWriter(path)
    w.write_many([{"id": "a", "x": 1}, {"id": "b", "x": 2}])
    w.write({"id": "c", "x": 3})
    w.close()
    with open(path, "ab") as f:
        f.write(b'{"id": "d", "x"')
    w = ResultWriter(path)
    assert sorted(w.done) == ["a", "b", "c"]
    w.write_many([{"id": "d", "x": 4}])
    w.close()
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c", "d"]


def test_inbox_from_other_threads_loses_nothing_and_wakes_once_per_wait(monkeypatch) -> None:
    """``_Inbox.put_threadsafe`` (the sandbox's result thread): every item arrives, in each
    thread's order, whether the loop is waiting, busy or pacing its turns; another thread
    wakes the loop only while it waits, at most once per wait."""
    import asyncio
    import random
    import threading
    import time

    from rstar.search.driver import _Inbox

    threads_n, per_thread = 4, 3000
    wakes = 0
    wake = _Inbox._wake

    def counted_wake(self: _Inbox) -> None:
        nonlocal wakes
        wakes += 1
        wake(self)

    monkeypatch.setattr(_Inbox, "_wake", counted_wake)

    async def main() -> tuple[list[tuple[str, int]], int]:
        inbox = _Inbox(asyncio.get_running_loop())

        def producer(k: int) -> None:
            rng = random.Random(k)
            for i in range(per_thread):
                inbox.put_threadsafe((f"t{k}", i))
                if rng.random() < 0.01:
                    time.sleep(0.0005)

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(threads_n)]
        for t in threads:
            t.start()
        got: list[tuple[str, int]] = []
        waits = 0
        rng = random.Random(0)
        while len(got) < threads_n * per_thread:
            if rng.random() < 0.3:
                await asyncio.sleep(0.001)  # pacing: nothing may wake the loop meanwhile
            if not inbox.items and not inbox._remote:
                waits += 1  # take() is about to wait
            got += await asyncio.wait_for(inbox.take(), 10)  # a lost wake-up fails, never hangs
        for t in threads:
            t.join()
        return got, waits

    got, waits = asyncio.run(main())
    assert len(got) == threads_n * per_thread
    for k in range(threads_n):
        assert [i for name, i in got if name == f"t{k}"] == list(range(per_thread))
    assert 0 < wakes <= waits + 1


@pytest.mark.parametrize("value", ["terminal", "ppm"])
def test_async_search_leaves_no_per_job_cycles(value: str) -> None:
    """Jobs, nodes and trees are freed by reference counting, not left to the cyclic GC
    (a job's sandbox futures and their countdown once formed a cycle: each collection then
    walked every in-flight token list, ~15% of the search's CPU at 1,000 trees)."""
    import gc

    cfg = mcts_cfg(value=value, pipeline="async")
    sandbox = FuturesSandbox()
    gc.collect()
    gc.disable()
    try:
        results, _ = run(cfg, QUESTIONS[:6], scorer=FakeScorer(), sandbox=sandbox)
        assert sandbox.submitted > 0 and len(results) == 6
        del results
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        sandbox.close()
    assert not kinds & {"_Job", "_Node", "_Tree", "_Countdown"}, kinds
