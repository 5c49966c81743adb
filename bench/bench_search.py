"""Search overhead and pipelines: async vs lock-step on the same problems, same rollouts.

The generator is a stand-in with realistic latency (a server with continuous batching: each
request takes ``base + per_token * tokens`` seconds, independent of others; a lock-step
batched call returns when its longest request finishes), so the numbers isolate the
search's own CPU work from model time:

    python bench/bench_search.py --trees 1000 --rollouts 2 --n 4

Reports, per pipeline: wall time, generated tokens/s, problems/s, and the share of wall
time the process spent on CPU (the search's own work; the stand-in generator, sandbox and
scorer cost ~nothing). Target: <= 2% at 1,000 concurrent trees; async faster than lock-step.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from rstar.backends import Completion, GenerationRequest  # noqa: F401 - the contract types
from rstar.search.config import SearchConfig
from rstar.search.driver import Searcher
from rstar.search.steps import split_steps

logger = logging.getLogger("bench_search")


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class _Tok:
    """A cheap tokenizer: 4 characters per token (ids are chunk hashes)."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [hash(text[i : i + 4]) & 0xFFFF for i in range(0, len(text), 4)]}


class LatencyGenerator:
    """Steps drawn from a small vocabulary by a hash of the request seed; latency scales
    with the tokens generated."""

    def __init__(self, base_s: float, per_token_s: float, step_tokens: int) -> None:
        self.tokenizer = _Tok()
        self.base_s = base_s
        self.per_token_s = per_token_s
        self.step_tokens = step_tokens
        self.busy_s = 0.0

    def _comps(self, req: Any) -> list[Any]:
        out = []
        for i in range(req.n):
            r = _h(req.seed, i, len(req.prompt_ids))
            c = r % 10
            pad = "#" * (4 * self.step_tokens - 30)
            if c < 5:
                text = f"\nx{r % 7} = {r % 5} {pad}\n<end_of_step>"
            elif c < 7:
                text = f"\nprint({r % 3}) {pad}\n<end_of_code>"
            elif c < 8:
                text = f"\ny = undefined {pad}\n<end_of_step>"
            else:
                text = f"\n<answer>{pad} \\boxed{{{r % 3}}}\n<end_of_answer>"
            stop = next(s for s in req.stop if text.endswith(s)) if any(text.endswith(s) for s in req.stop) else None
            out.append(Completion(text, [1] * self.step_tokens, stop, "stop"))
        return out

    def _latency(self, req: Any) -> float:
        return self.base_s + self.per_token_s * self.step_tokens

    async def agenerate(self, req: Any, *, dedup: bool = False) -> list[Any]:
        await asyncio.sleep(self._latency(req))
        return self._comps(req)

    def generate(self, reqs: list[Any], *, dedup: bool = False) -> list[list[Any]]:
        time.sleep(max((self._latency(r) for r in reqs), default=0.0))
        return [self._comps(r) for r in reqs]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Res:
    ok: bool
    observation: str
    status: str = "ok"


class InstantSandbox:
    """Code 'runs' instantly: a step fails iff it references ``undefined``."""

    async def arun(self, program: str) -> _Res:
        bad = "undefined" in program
        return _Res(not bad, "NameError: undefined" if bad else "1", "error" if bad else "ok")

    def close(self) -> None:
        pass


class StrGrader:
    def grade_many(self, preds: list[str | None], golds: list[str]) -> list[bool]:
        return [p == g for p, g in zip(preds, golds)]

    def close(self) -> None:
        pass


class HashScorer:
    def score(self, reqs: list[Any]) -> list[float]:
        return [((_h(len(r.prompt_ids), r.prompt_ids[-1]) % 200) - 100) / 100.0 for r in reqs]

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
                       reference_engine=args.reference)
    problems = [_P(f"q{i}", f"Problem {i}: compute {i} mod 3.", str(i % 3)) for i in range(args.trees)]
    gen = LatencyGenerator(args.base_ms / 1000, args.per_token_ms / 1000, args.step_tokens)
    scorer = HashScorer() if args.value != "terminal" else None
    s = Searcher(gen, scorer, cfg, sandbox=InstantSandbox(), grader=StrGrader())
    c0, w0 = time.process_time(), time.perf_counter()
    res = s.run(problems, progress=False)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    nodes = sum(len(r.record["nodes"]) for r in res)
    return {"pipeline": pipeline, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "cpu_share": round(cpu / wall, 4), "loop_s": round(s.stats.loop_s, 3),
            "tokens_per_s": round(s.stats.tokens / wall, 1), "problems_per_s": round(len(res) / wall, 2),
            "nodes": nodes, "expansions": s.stats.expansions, "engine": type(s.forest).__name__}


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
    p.add_argument("--reference", action="store_true", help="pure-Python engine (when _core is not built)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = [run_once("async", args), run_once("lockstep", args)]
    print(f"{'pipeline':<9} {'wall s':>8} {'cpu s':>7} {'cpu %':>6} {'tok/s':>9} {'prob/s':>7} {'nodes':>7}")  # noqa: T201
    for r in rows:
        print(f"{r['pipeline']:<9} {r['wall_s']:>8.2f} {r['cpu_s']:>7.2f} {100 * r['cpu_share']:>5.1f}% "  # noqa: T201
              f"{r['tokens_per_s']:>9.0f} {r['problems_per_s']:>7.2f} {r['nodes']:>7}")
    print(f"engine: {rows[0]['engine']}; async speed-up {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}x")  # noqa: T201
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
