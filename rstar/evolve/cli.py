"""``rstar evolve`` (self-evolution rounds) and ``rstar eval`` (test-time methods on benchmarks).

    rstar evolve [--config nano|nano-ci|qwen-math-7b|FILE] [--rounds N] [--dry-run] [key=value ...]
    rstar eval --model DIR [--ppm DIR] --data math500 [--data nano:eval:120] [--methods greedy,bon,mcts]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


def build_evolve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rstar evolve",
        description="Run rStar-Math self-evolution: per round, search the training problems (round 1: the "
        "bootstrap model with terminal-guided annotation; later rounds: the previous policy, from round 3 guided "
        "by its PPM), mine SFT rows (top-2 trajectories per problem) and PPM pairs, fine-tune the policy from "
        "the base model, train the PPM from the new policy, and evaluate (greedy, best-of-N with majority and "
        "PPM votes, MCTS+PPM). Every stage is resumable: run the same command again after a kill.",
        epilog="Shipped configs: nano (the default main job, ~30 min on 2 CPU cores), nano-ci (two short "
        "rounds), qwen-math-7b (the paper's setting on a GPU cluster). Overrides: key=value, e.g. "
        "rounds.1.overrides=[rollouts=8] eval.n=8 output_dir=runs/x.",
    )
    p.add_argument("--config", default="nano", help="shipped config name or YAML file (default nano)")
    p.add_argument("--rounds", type=int, default=None, help="run only the first N rounds")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the reports from what is on disk")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p


def main_evolve(argv: Sequence[str] | None = None) -> int:
    args = build_evolve_parser().parse_args(argv)
    from rstar.config import dump_yaml
    from rstar.evolve.config import load_evolve_config
    from rstar.evolve.pipeline import Evolution

    cfg = load_evolve_config(args.config, args.overrides)
    evo = Evolution(cfg, progress=not args.no_progress)
    if args.dry_run:
        print(dump_yaml(cfg), end="")  # noqa: T201 - the requested output
        print("# plan")  # noqa: T201
        for step in evo.plan():
            where = "setup" if step["round"] < 0 else f"round {step['round']}"
            info = {k: v for k, v in step.items() if k not in ("round", "stage", "done")}
            print(f"# {where:8s} {step['stage']:12s} {'done' if step['done'] else 'todo':5s} "  # noqa: T201
                  f"{json.dumps(info)}")
        return 0
    rep = evo.report() if args.report_only else evo.run(rounds=args.rounds)
    from rstar.evolve.report import run_markdown

    print(run_markdown(rep))  # noqa: T201 - the round table is the job's output
    logger.info("report: %s/report.md, plot: %s/accuracy.png", cfg.output_dir, cfg.output_dir)
    return 0


def _problem_set(spec: str, limit: int | None) -> tuple[str, Any]:
    """``math500`` / a file / ``nano:eval:120[:1,2,3]`` -> (label, problems)."""
    from rstar.evolve.config import ProblemSource
    from rstar.evolve.problems import load_source

    if spec.startswith("nano:"):
        parts = spec.split(":")
        split = parts[1] if len(parts) > 1 and parts[1] else "eval"
        n = int(parts[2]) if len(parts) > 2 and parts[2] else (limit or 120)
        diffs = [int(x) for x in parts[3].split(",")] if len(parts) > 3 and parts[3] else None
        src = ProblemSource(source="nano", split=split, n=n, difficulties=diffs)
    else:
        src = ProblemSource(source=spec, split="", n=limit)
    return src.label, load_source(src)


def main_eval(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rstar eval",
        description="Evaluate a policy (and a PPM) on problem sets with greedy decoding, best-of-N (majority "
        "and PPM votes over the same N samples) and MCTS with the PPM (N rollouts); writes the trees of each "
        "method and a JSON of accuracies (overall, by budget, by difficulty, tokens per problem).",
    )
    p.add_argument("--model", required=True, help="policy model directory")
    p.add_argument("--ppm", default=None, help="PPM directory (bon PPM vote and mcts need it)")
    p.add_argument("--data", action="append", required=True,
                   help="benchmark name, data file or nano:SPLIT:N[:DIFFS]; repeatable")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each set")
    p.add_argument("--methods", default="greedy,bon,mcts", help="comma list of greedy, bon, mcts")
    p.add_argument("--n", type=int, default=16, help="samples (best-of-N) and rollouts (MCTS) per problem")
    p.add_argument("--budgets", default="1,2,4,8,16", help="budgets of the accuracy-by-budget curves")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="METHOD.key=value overrides, e.g. mcts.n=4 bon.generation.temperature=0.8")
    args = p.parse_args(argv)
    from pathlib import Path

    from rstar.evolve.evaluate import evaluate
    from rstar.evolve.pipeline import make_generator, make_scorer
    from rstar.evolve.stages import write_json_atomic

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    per: dict[str, list[str]] = {"greedy": [], "bon": [], "mcts": []}
    for o in args.overrides:
        head, _, rest = o.partition(".")
        if head not in per or not rest:
            p.error(f"override {o!r}: write METHOD.key=value with METHOD in greedy, bon, mcts")
        per[head].append(rest)
    sets = dict(_problem_set(s, args.limit) for s in args.data)
    gen = make_generator(args.backend, args.model)
    scorer = make_scorer(args.backend, args.ppm) if args.ppm else None
    try:
        res = evaluate(gen, scorer, sets, args.out, methods=methods, n=args.n,
                       budgets=[int(x) for x in args.budgets.split(",") if x], overrides=per, seed=args.seed,
                       progress=not args.no_progress)
    finally:
        gen.close()
        if scorer is not None:
            scorer.close()
    write_json_atomic(Path(args.out) / "eval.json", res)
    print(json.dumps(res, indent=1))  # noqa: T201 - the requested output
    return 0
