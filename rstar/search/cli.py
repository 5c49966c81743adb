"""``rstar search``: search a problem set with a policy (and a PPM) and write the trees.

    rstar search --config eval_mcts --data math500 --model DIR [--ppm DIR] --out trees.jsonl \\
        [--backend hf|vllm] [--limit N] [key=value ...]

``--config`` is a preset name (see ``rstar.search.config.PRESETS``) or a YAML file;
trailing ``key=value`` arguments override any field (``n=16 generation.temperature=0.8``).
The output is resumable: run the same command again after a kill and it finishes the rest.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="rstar search", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="eval_mcts", help="preset name or YAML file (default eval_mcts)")
    p.add_argument("--data", required=True, help="benchmark name (math500, gsm8k, ...) or a data file")
    p.add_argument("--model", required=True, help="policy model directory")
    p.add_argument("--ppm", default=None, help="PPM directory (needed by PPM-guided configs)")
    p.add_argument("--out", required=True, help="output JSONL (one tree per problem; resumable)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="generation backend")
    p.add_argument("--limit", type=int, default=None, help="first N problems only")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p


def _load_problems(data: str, limit: int | None) -> list[Any]:
    from pathlib import Path

    from rstar.data import load_problems, resolve_benchmark

    src = Path(data) if Path(data).exists() else resolve_benchmark(data)
    return load_problems(src, limit=limit)


def _generator(backend: str, model: str) -> Any:
    if backend == "vllm":
        from rstar.backends import VLLMGenerator

        return VLLMGenerator(model)
    from rstar.backends import HFGenerator

    return HFGenerator(model)


def _scorer(backend: str, path: str) -> Any:
    if backend == "vllm":
        try:
            from rstar.backends import VLLMScorer

            return VLLMScorer(path)
        except ImportError:
            logger.warning("no vLLM scorer available: scoring with transformers")
    from rstar.backends import HFScorer

    return HFScorer(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rstar search``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from rstar.config import dump_yaml
    from rstar.search.config import load_search_config
    from rstar.search.driver import Searcher

    cfg = load_search_config(args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg), end="")  # noqa: T201 - the requested output
        return 0
    if cfg.needs_scorer and not args.ppm:
        raise SystemExit(f"config {args.config!r} needs a PPM: pass --ppm DIR")
    problems = _load_problems(args.data, args.limit)
    gen = _generator(args.backend, args.model)
    scorer = _scorer(args.backend, args.ppm) if args.ppm else None
    try:
        with Searcher(gen, scorer, cfg) as s:
            results = s.run(problems, args.out, progress=not args.no_progress)
    finally:
        gen.close()
        if scorer is not None:
            scorer.close()
    solved = sum(1 for r in results if r.correct)
    logger.info("%d problems, %d solved (%.1f%%) -> %s", len(results), solved,
                100.0 * solved / max(len(results), 1), args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
