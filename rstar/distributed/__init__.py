"""Scale-out: the search on Ray actors, deterministic shards, and merging shard outputs.

    from rstar.distributed import SearchJob, run_search_job
    job = SearchJob(model="policy", config=load_search_config("round2"))
    run_search_job(job, problems, "trees.jsonl")                      # this process
    run_search_job(job, problems, "trees.jsonl", ray_address=True)    # Ray actors
    run_search_job(job, problems, "t.3.jsonl", shard=(3, 8))          # one shard of 8

Importing this package never imports Ray (only the Ray path does). See docs/distributed.md."""

from __future__ import annotations

from rstar.distributed.job import (
    SearchComponents,
    SearchJob,
    build_components,
    build_searcher,
    make_generator,
    make_scorer,
    run_local,
)
from rstar.distributed.run import run_search_job
from rstar.distributed.shard import (
    MergeReport,
    failure_record,
    format_shard_path,
    is_failure,
    merge_shards,
    select_shard,
    shard_of,
)

__all__ = [
    "MergeReport",
    "SearchComponents",
    "SearchJob",
    "build_components",
    "build_searcher",
    "failure_record",
    "format_shard_path",
    "is_failure",
    "make_generator",
    "make_scorer",
    "merge_shards",
    "run_local",
    "run_search_job",
    "select_shard",
    "shard_of",
]
