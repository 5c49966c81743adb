"""Test doubles for the search tests: a char-level tokenizer, a scripted generator whose
steps are a deterministic function of the prompt, an in-process sandbox, a string grader, a
text-keyed scorer, and an independent sequential re-implementation of the official
rStar-Math MCTS (rstar-math.md §2) that the engine-driven search must match exactly."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rstar.search import steps as S

from rstar.backends import Completion, GenerationRequest, ScoreRequest  # noqa: F401


class CharTokenizer:
    """One token per character (ids = code points): decode(encode(x)) == x exactly."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def h(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def split_prompt(prompt: str) -> tuple[str, list[str]]:
    """(question, steps so far) from an SFT-format prompt."""
    head, _, partial = prompt.partition("solve the problem with code.")
    question = head.split("<|user|>:\n", 1)[1].rsplit("\n\n<|assistant|>", 1)[0]
    return question, S.split_steps(partial) if partial else []


Policy = Callable[[str, list[str], int, GenerationRequest], list[str]]


def random_policy(question: str, steps: list[str], i: int, req: GenerationRequest) -> str:
    """A step chosen by a hash of (question, path, sample index): good code, failing code,
    block end, right or wrong answers, and duplicates (a small vocabulary)."""
    r = h(question, len(steps), "".join(steps), i)
    k = r % 3
    choice = (r >> 8) % 10
    head = "" if steps and not S.closes_block(steps[-1]) else "<code>"
    if steps and S.closes_block(steps[-1]):
        head = "\n<code>"
    if choice < 3:
        return f"{head}\nx{len(steps)} = {k}\n<end_of_step>"
    if choice < 4:
        return f"{head}\ny = undefined_{k}\n<end_of_step>"
    if choice < 6:
        return f"{head}\nprint({k})\n<end_of_code>"
    if choice < 8:
        return f"\n<answer>so \\boxed{{{k}}}\n<end_of_answer>"
    return f"{head}\nz = {k}\n<end_of_step>"


class ScriptedGenerator:
    """Implements the Generator protocol: completions are ``policy(question, steps, i)``."""

    def __init__(self, policy: Callable[..., str] = random_policy, latency_s: float = 0.0) -> None:
        self.tokenizer = CharTokenizer()
        self.policy = policy
        self.latency_s = latency_s
        self.requests: list[GenerationRequest] = []

    def _one(self, req: GenerationRequest) -> list[Completion]:
        self.requests.append(req)
        prompt = self.tokenizer.decode(req.prompt_ids) if req.prompt_ids is not None else req.prompt
        question, steps = split_prompt(prompt)
        out = []
        for i in range(req.n):
            text = self.policy(question, steps, i, req)
            stop = next((s for s in req.stop if text.endswith(s)), None)
            out.append(Completion(text, [ord(c) for c in text], stop, "stop" if stop else "length"))
        return out

    def generate(self, requests: Sequence[GenerationRequest], *, dedup: bool = False) -> list[list[Completion]]:
        return [self._one(r) for r in requests]

    async def agenerate(self, request: GenerationRequest, *, dedup: bool = False) -> list[Completion]:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return self._one(request)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class FakeResult:
    ok: bool
    status: str
    stdout: str
    error: str | None

    @property
    def observation(self) -> str:
        return self.stdout.strip() if self.ok else (self.error or "")


def run_program(program: str) -> FakeResult:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(program, "<step>", "exec"), {"__name__": "__main__"})
    except Exception as exc:  # noqa: BLE001 - the step's own failure
        return FakeResult(False, "error", buf.getvalue(), f"{type(exc).__name__}: {exc}")
    return FakeResult(True, "ok", buf.getvalue(), None)


class FakeSandbox:
    """In-process executor with a fresh namespace per program (tests only)."""

    def __init__(self) -> None:
        self.programs: list[str] = []

    def run(self, program: str) -> FakeResult:
        self.programs.append(program)
        return run_program(program)

    async def arun(self, program: str) -> FakeResult:
        return self.run(program)

    def close(self) -> None:
        pass


class FakeGrader:
    def grade_many(self, preds: Sequence[str | None], golds: Sequence[str]) -> list[bool]:
        return [p is not None and p.strip() == g.strip() for p, g in zip(preds, golds)]

    def is_equiv(self, pred: str | None, gold: str) -> bool:
        return self.grade_many([pred], [gold])[0]

    def close(self) -> None:
        pass


def ppm_of(text: str) -> float:
    """The fake PPM: a deterministic value in [-0.9, 0.9] from the scored text."""
    return ((h(text) % 1801) - 900) / 1000.0


class FakeScorer:
    def __init__(self) -> None:
        self.tokenizer = CharTokenizer()
        self.calls = 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        self.calls += 1
        return [ppm_of(self.tokenizer.decode(r.prompt_ids)) for r in requests]

    def close(self) -> None:
        pass


@dataclass
class Problem:
    id: str
    question: str
    answer: str
    source: str = ""


# --------------------------------------------------------------------------- official MCTS
class RNode:
    def __init__(self, parent: RNode | None, text: str, depth: int) -> None:
        self.parent = parent
        self.text = text
        self.depth = depth
        self.children: list[RNode] = []
        self.N = 0
        self.W = 0.0
        self.terminal = False
        self.valid = True
        self.errors = 0
        self.timed_out = False
        self.answer: str | None = None
        self.order = -1

    def q(self) -> float:
        return self.W / self.N if self.N else 0.0

    def update(self, v: float) -> None:
        self.N += 1
        self.W += v

    def update_recursive(self, v: float) -> None:
        n: RNode | None = self
        while n is not None:
            n.update(v)
            n = n.parent


def official_mcts(question: str, gold: str, gen: ScriptedGenerator, *, n: int, rollouts: int, max_depth: int,
                  threshold: int, value: str, c: float = 2.0, collapse: bool = True,
                  dedup: bool = True) -> list[RNode]:
    """A sequential transcription of the official solver loop (solver.py:221-265 and
    agents/mcts.py), one tree; returns nodes in creation order."""
    from rstar.search.prompts import build_prompt

    root = RNode(None, "", 0)
    order = [root]
    scorer = FakeScorer()

    def path(node: RNode) -> list[RNode]:
        out = []
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def select_child(node: RNode) -> RNode | None:
        best, best_s = None, -math.inf
        for ch in node.children:
            if ch.terminal:
                continue
            u = c * math.sqrt(math.log(node.N) / ch.N) if (node.N > 1 and ch.N > 0) else 0.0
            s = ch.q() + u
            if s > best_s:
                best, best_s = ch, s
        if best is None:
            node.terminal = True
        return best

    def selection(node: RNode) -> RNode | None:
        if node.terminal:
            return None
        if not node.children:
            return node
        return select_child(node)

    def expand(node: RNode) -> None:
        texts = [t.text for t in path(node)[1:]]
        prompt = build_prompt(question, "".join(texts))
        req = GenerationRequest(prompt_ids=[ord(ch) for ch in prompt], n=n, stop=S.STEP_STOPS)
        comps = gen._one(req)
        if collapse:
            for cpl in comps:
                if cpl.stop == S.END_OF_ANSWER:
                    comps = [cpl]
                    break
        seen = set()
        for cpl in comps:
            if dedup:
                if cpl.text in seen:
                    continue
                seen.add(cpl.text)
            ps = S.parse_step(cpl.text, cpl.stop)
            ch = RNode(node, cpl.text, node.depth + 1)
            ch.errors = node.errors
            node.children.append(ch)
            ch.order = len(order)
            order.append(ch)
            if ch.depth > max_depth:
                ch.terminal, ch.valid = True, False
            elif ps.kind is S.StepKind.ANSWER:
                ch.terminal = True
                ch.answer = ps.answer
                ch.valid = ps.answer is not None
            elif ps.kind is S.StepKind.TRUNCATED:
                ch.terminal, ch.valid = True, False
            else:
                skip = [p.timed_out for p in path(node)[1:]]
                r = run_program(S.block_program(texts, cpl.text, skip))
                ch.errors = S.next_error_count(node.errors, r.ok)
                if ps.closes_block or ch.errors >= threshold:
                    ch.text += S.observation_text(r.observation)
                if ch.errors >= threshold:
                    ch.terminal, ch.valid = True, False
            if ch.terminal and not ch.valid:
                ch.update(-1.0)
            elif ch.terminal and value in ("terminal", "ppm_init"):
                ch.update_recursive(1.0 if (ch.answer or "").strip() == gold.strip() else -1.0)
        # PPM step (value_postprocess)
        if value in ("ppm", "ppm_init"):
            for ch in node.children:
                if not ch.valid:
                    continue
                prompt_ch = build_prompt(question, "".join(texts) + ch.text)
                v = ppm_of(prompt_ch)
                if not ch.terminal:
                    ch.update(v)
                elif value == "ppm":
                    ch.update_recursive(v)

    for _ in range(rollouts):
        cur = selection(root)
        for _step in range(max_depth):
            if cur is None or cur.terminal:
                break
            if not cur.children:
                expand(cur)
            cur = select_child(cur) if cur.children else selection(cur)
        if root.terminal:
            break
    return order
