"""The ``rstar`` command: one entry point, one subcommand per job.

Each subcommand lives with the module that does the work; this file only dispatches, so
``rstar --help`` stays fast and never imports torch or vLLM."""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys
from pathlib import Path

# name -> (module, function, one-line help). The function takes argv (list[str]) and
# returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "search": (
        "rstar.search.cli",
        "main",
        "search problems with MCTS / beam / best-of-N / greedy and write one tree per problem",
    ),
    "mine": ("rstar.train.cli", "main_mine", "mine SFT rows and PPM pairs from search trees"),
    "train-sft": ("rstar.train.cli", "main_sft", "fine-tune the policy on SFT rows mined from trees"),
    "train-ppm": ("rstar.train.cli", "main_ppm", "train the process preference model on mined pairs"),
    "merge": (
        "rstar.distributed.cli",
        "main_merge",
        "merge shard outputs of `rstar search --shard-index` and report missing / duplicated problems",
    ),
    "evolve": (
        "rstar.evolve.cli",
        "main_evolve",
        "self-evolution: rounds of search -> SFT + PPM pairs -> policy -> PPM -> evaluation",
    ),
    "eval": ("rstar.evolve.cli", "main_eval", "evaluate a policy (+PPM): greedy, best-of-N, MCTS+PPM"),
    "bench": ("rstar.cli", "main_bench", "run a benchmark suite from bench/ and print its table"),
}

BENCH_SUITES = ("engine", "sandbox", "grading", "backends", "search", "distributed")


def _repo_bench_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "bench"


def main_bench(argv: list[str]) -> int:
    """``rstar bench SUITE [--quick] [...]``: run ``bench/bench_SUITE.py`` standalone."""
    parser = argparse.ArgumentParser(
        prog="rstar bench",
        description="Run one benchmark suite and print its table (ratios are measured in the same run).",
    )
    parser.add_argument("suite", choices=BENCH_SUITES)
    args, rest = parser.parse_known_args(argv)
    script = _repo_bench_dir() / f"bench_{args.suite}.py"
    if not script.is_file():
        print(
            f"rstar bench: {script} not found; benchmarks ship with the source tree "
            "(install with `pip install -e .` from a clone)",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(script), *rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rstar",
        description="rStar-Math at scale: search, train, evaluate. "
        "Run `rstar SUBCOMMAND --help` for the options of each subcommand.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (_, _, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Split global options from the subcommand's own arguments.
    idx = next((i for i, a in enumerate(argv) if a in SUBCOMMANDS), None)
    if idx is None:
        args = parser.parse_args(argv)
        parser.print_help()
        return 0 if not argv or "-h" in argv or "--help" in argv else 2
    args = parser.parse_args(argv[:idx])
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    name = argv[idx]
    module_name, func_name, _ = SUBCOMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(argv[idx + 1 :]) or 0)


if __name__ == "__main__":
    sys.exit(main())
