"""Entry points of ``rstar train-sft``, ``rstar train-ppm`` and ``main_mine`` (tree mining;
also ``python -m rstar.train.cli mine|sft|ppm ...``).

Multi-GPU: launch through accelerate, e.g.
``accelerate launch --config_file configs/train/accelerate_fsdp.yaml -m rstar.cli train-ppm ...``;
``--fsdp`` / ``--deepspeed`` flags of ``TrainingArguments`` pass through as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main_sft(argv: Sequence[str] | None = None) -> int:
    """``rstar train-sft --model BASE --data sft.jsonl|trees.jsonl --output_dir DIR [TrainingArguments]``"""
    from rstar.train.common import parse_arguments
    from rstar.train.sft import SFTArguments, train_sft

    _setup_logging()
    script, targs = parse_arguments(argv, SFTArguments, "rstar train-sft")
    result = train_sft(script, targs)
    logger.info("SFT done: %s (train %s, eval %s)", result.output_dir, result.train_metrics, result.eval_metrics)
    return 0


def main_ppm(argv: Sequence[str] | None = None) -> int:
    """``rstar train-ppm --model POLICY|PPM --data pairs.jsonl|trees.jsonl --output_dir DIR [TrainingArguments]``"""
    from rstar.train.common import parse_arguments
    from rstar.train.ppm import PPMArguments, train_ppm

    _setup_logging()
    script, targs = parse_arguments(argv, PPMArguments, "rstar train-ppm")
    result = train_ppm(script, targs)
    logger.info("PPM done: %s (train %s, eval %s)", result.output_dir, result.train_metrics, result.eval_metrics)
    return 0


def main_mine(argv: Sequence[str] | None = None) -> int:
    """Mine search trees into SFT rows and/or PPM pairs (JSONL) and print the statistics."""
    from rstar.search.prompts import PromptConfig
    from rstar.train.mining import PairMiningConfig, SFTMiningConfig, mine_files

    p = argparse.ArgumentParser(prog="rstar mine", description=main_mine.__doc__)
    p.add_argument("trees", nargs="+", help="search output JSONL file(s)")
    p.add_argument("--sft-out", help="write SFT rows here")
    p.add_argument("--pairs-out", help="write PPM pairs here")
    p.add_argument("--top-n", type=int, default=2, help="SFT trajectories per problem")
    p.add_argument("--top-k", type=int, default=2, help="pair candidates per side")
    p.add_argument("--top-k-single", type=int, default=4, help="pair candidates when the other side has one")
    p.add_argument("--min-margin", type=float, default=0.5)
    p.add_argument("--min-edit-distance", type=int, default=20)
    p.add_argument("--prompt-format", default="sft", choices=("sft", "bootstrap"))
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if not args.sft_out and not args.pairs_out:
        p.error("give --sft-out and/or --pairs-out")
    _setup_logging()
    prompt = PromptConfig(format=args.prompt_format)
    stats = mine_files(
        args.trees,
        sft_out=args.sft_out,
        pairs_out=args.pairs_out,
        sft_config=SFTMiningConfig(top_n=args.top_n, prompt=prompt),
        pair_config=PairMiningConfig(top_k=args.top_k, top_k_single=args.top_k_single, min_margin=args.min_margin,
                                     min_edit_distance=args.min_edit_distance, prompt=prompt),
    )
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":  # python -m rstar.train.cli {mine|sft|ppm} ...
    _cmds = {"mine": main_mine, "sft": main_sft, "ppm": main_ppm}
    if len(sys.argv) < 2 or sys.argv[1] not in _cmds:
        print("usage: python -m rstar.train.cli {mine|sft|ppm} [args]", file=sys.stderr)
        sys.exit(2)
    sys.exit(_cmds[sys.argv[1]](sys.argv[2:]))
