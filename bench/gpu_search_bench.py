"""One-shot GPU check: generated tokens/s with the search vs the backend alone.

A randomly initialised Qwen2.5-0.5B-shaped model (``rstar.testing.build_tiny_model`` with
the 0.5B shape) behind ``rstar.backends.HFGenerator``; 1,000 MCTS trees (async pipeline,
terminal values) on math500 questions; then the backend alone on the same number of
requests at the batch size the search used. ``--tiny`` runs the same on CPU with a tiny
model as a smoke test.

    python bench/gpu_search_bench.py            # on the lent GPU
    python bench/gpu_search_bench.py --tiny     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("gpu_search_bench")

QWEN05B = dict(hidden_size=896, layers=24)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--trees", type=int, default=1000)
    p.add_argument("--rollouts", type=int, default=2)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--out", default=None, help="JSON results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    from rstar.backends import GenerationRequest, HFGenerator
    from rstar.data import load_problems
    from rstar.search.config import load_search_config
    from rstar.search.driver import Searcher
    from rstar.testing import build_tiny_model

    trees = 8 if args.tiny and args.trees == 1000 else args.trees
    shape = {} if args.tiny else QWEN05B
    model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "model", **shape)
    gen = HFGenerator(str(model_dir))
    problems = load_problems(Path(args.data_dir) / "MATH_test.json", limit=trees)
    cfg = load_search_config("round2", [f"n={args.n}", f"rollouts={args.rollouts}", "max_depth=4",
                                        f"concurrent_trees={trees}",
                                        f"generation.max_new_tokens={args.max_new_tokens}"])
    t0 = time.perf_counter()
    with Searcher(gen, None, cfg) as s:
        s.run(problems, progress=True)
        search_tokens, search_wall = s.stats.tokens, time.perf_counter() - t0
        expansions = s.stats.expansions
    # the backend alone: the same number of requests, prompts of the search's length
    prompt = gen.tokenizer(problems[0].question)["input_ids"]
    reqs = [GenerationRequest(prompt_ids=list(prompt), n=args.n, max_new_tokens=args.max_new_tokens,
                              stop=tuple(cfg.generation.stop), seed=i) for i in range(min(expansions, trees))]
    t1 = time.perf_counter()
    outs = gen.generate(reqs)
    alone_wall = time.perf_counter() - t1
    alone_tokens = sum(len(c.token_ids) for o in outs for c in o)
    gen.close()
    row = {"trees": trees, "search_tokens_per_s": search_tokens / search_wall,
           "backend_tokens_per_s": alone_tokens / alone_wall, "search_wall_s": search_wall,
           "expansions": expansions, "batch": len(reqs)}
    print(json.dumps(row, indent=1))  # noqa: T201
    if args.out:
        Path(args.out).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
