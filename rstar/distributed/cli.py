"""``rstar merge``: combine the outputs of ``rstar search --shard-index I --num-shards N``.

    rstar merge trees.*.jsonl --data math500 --out trees.jsonl

Reads every input (a torn last line from a killed shard is skipped and reported), keeps the
first record of an id that occurs more than once, writes the merged file atomically (in the
problem list's order when ``--data`` is given) and reports missing, duplicated and unexpected
ids and failure records. Exit status 1 when a problem is missing or duplicated (unless
``--allow-missing`` / ``--allow-duplicates``), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rstar merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="shard outputs (JSONL, one record per problem)")
    p.add_argument("--out", default=None, help="merged output (omit to only check)")
    p.add_argument("--data", default=None,
                   help="the problem list the shards came from (benchmark name or file): reports missing ids")
    p.add_argument("--limit", type=int, default=None, help="first N problems of --data (as given to search)")
    p.add_argument("--drop-failed", action="store_true",
                   help="leave failure records out (a rerun with the merged output then retries them)")
    p.add_argument("--allow-missing", action="store_true", help="exit 0 even when problems are missing")
    p.add_argument("--allow-duplicates", action="store_true", help="exit 0 even when ids are duplicated")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main_merge(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rstar merge``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from rstar.distributed.shard import merge_shards

    problems = None
    if args.data is not None:
        from rstar.search.cli import _load_problems

        problems = _load_problems(args.data, args.limit)
    try:
        rep = merge_shards(args.inputs, args.out, problems, drop_failed=args.drop_failed)
    except (OSError, ValueError) as exc:
        print(f"rstar merge: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1))  # noqa: T201 - the requested output
    else:
        print(rep.summary() + (f" -> {args.out}" if args.out else ""))  # noqa: T201
    bad = (rep.missing and not args.allow_missing) or (rep.duplicated and not args.allow_duplicates)
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_merge())
