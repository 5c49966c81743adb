"""``rstar search``: search a problem set with a policy (and a PPM) and write the trees.

    rstar search --config eval_mcts --data math500 --model DIR [--ppm DIR] --out trees.jsonl \\
        [--backend hf|vllm] [--limit N] [key=value ...]

``--config`` is a preset name (see ``rstar.search.config.PRESETS``) or a YAML file;
trailing ``key=value`` arguments override any field (``n=16 generation.temperature=0.8``).
The output is resumable: run the same command again after a kill and it finishes the rest.

Scale-out (docs/distributed.md):

    rstar search ... --ray [ADDRESS] [--num-actors N] [--actor-cpus C] [--actor-gpus G]
    rstar search ... --shard-index I --num-shards N --out trees.{shard}.jsonl
    rstar merge trees.*.jsonl --data math500 --out trees.jsonl

``--ray`` alone connects to the Ray cluster Ray finds (``RAY_ADDRESS``, or ``ray start`` on
this machine) or starts a local one; ``--ray auto`` needs an existing cluster; ``--ray
HOST:PORT`` names one. Shards are chosen by a stable hash of the problem id.
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
    p.add_argument("--out", required=True,
                   help="output JSONL (one tree per problem; resumable); {shard} and {num_shards} are filled in")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="generation backend")
    p.add_argument("--gen-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="generator option (HFGeneratorConfig / VLLMConfig field), repeatable")
    p.add_argument("--ppm-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="scorer option (HFScorerConfig / VLLMConfig field), repeatable")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per searching process")
    p.add_argument("--limit", type=int, default=None, help="first N problems only")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("scale-out")
    g.add_argument("--shard-index", type=int, default=None, help="search only this shard (0-based)")
    g.add_argument("--num-shards", type=int, default=None, help="number of shards (by a stable hash of the id)")
    g.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="search on Ray actors; ADDRESS: auto | local | HOST:PORT | ray://HOST:PORT "
                        "(alone: the cluster Ray finds, else a new local one)")
    g.add_argument("--num-actors", type=int, default=None,
                   help="Ray actors (default: as many as the cluster's CPUs/GPUs hold)")
    g.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per actor (default 1)")
    g.add_argument("--actor-gpus", type=float, default=0.0, help="GPUs per actor (default 0; 1 = one actor per GPU)")
    g.add_argument("--batch-size", type=int, default=None, help="problems per actor call")
    g.add_argument("--max-retries", type=int, default=1,
                   help="failed calls a problem may take part in beyond the first before it is written "
                        "as a failure record (default 1)")
    g.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                   help="kill an actor whose batch returns nothing for this long")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p


def _load_problems(data: str, limit: int | None) -> list[Any]:
    from pathlib import Path

    from rstar.data import load_problems, resolve_benchmark

    src = Path(data) if Path(data).exists() else resolve_benchmark(data)
    return load_problems(src, limit=limit)


def _options(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` backend options (YAML scalars); dotted keys nest:
    ``extra.swap_space=4`` -> ``{"extra": {"swap_space": 4}}``."""
    from rstar.config import ConfigError, parse_override

    out: dict[str, Any] = {}
    for item in items:
        try:
            path, value = parse_override(item)
        except ConfigError as exc:
            raise SystemExit(f"{flag}: {exc}") from exc
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = value
    return out


def _generator(backend: str, model: str) -> Any:
    from rstar.distributed.job import make_generator

    return make_generator(backend, model)


def _scorer(backend: str, path: str) -> Any:
    from rstar.distributed.job import make_scorer

    return make_scorer(backend, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rstar search``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if isinstance(args.ray, str) and "=" in args.ray:  # `--ray n=4 ...`: an override, not an address
        args.overrides.insert(0, args.ray)
        args.ray = True
    from rstar.config import dump_yaml
    from rstar.search.config import load_search_config

    cfg = load_search_config(args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg), end="")  # noqa: T201 - the requested output
        return 0
    if cfg.needs_scorer and not args.ppm:
        raise SystemExit(f"config {args.config!r} needs a PPM: pass --ppm DIR")
    shard = None
    if args.shard_index is not None or args.num_shards is not None:
        if args.shard_index is None or args.num_shards is None:
            raise SystemExit("--shard-index and --num-shards go together")
        from rstar.distributed.shard import check_shard

        try:
            check_shard(args.shard_index, args.num_shards)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        shard = (args.shard_index, args.num_shards)
    elif "{shard}" in args.out:
        raise SystemExit("--out has {shard} but no --shard-index / --num-shards")
    from rstar.distributed import SearchJob, format_shard_path, run_search_job

    out = format_shard_path(args.out, *shard) if shard else args.out
    job = SearchJob(model=args.model, config=cfg, ppm=args.ppm, backend=args.backend,
                    backend_kwargs=_options(args.gen_opt, "--gen-opt"),
                    scorer_kwargs=_options(args.ppm_opt, "--ppm-opt"), torch_threads=args.torch_threads)
    problems = _load_problems(args.data, args.limit)
    results = run_search_job(
        job, problems, out, ray_address=args.ray, num_actors=args.num_actors,
        actor_options={"num_cpus": args.actor_cpus, "num_gpus": args.actor_gpus}, batch_size=args.batch_size,
        shard=shard, progress=not args.no_progress, max_retries=args.max_retries,
        stall_timeout_s=args.stall_timeout, keep_records=False,
    )
    solved = sum(1 for r in results if r.correct)
    failed = sum(1 for r in results if r.record.get("failed"))
    logger.info("%d problems, %d solved (%.1f%%)%s -> %s", len(results), solved,
                100.0 * solved / max(len(results), 1), f", {failed} failed" if failed else "", out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
