"""``run_search_job``: the one entry point of ``rstar search`` (and of ``rstar evolve``'s search
and evaluation stages), local or on Ray, whole or one shard."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rstar.distributed.job import SearchJob, run_local
from rstar.distributed.ray_runner import EventHook
from rstar.distributed.shard import select_shard

logger = logging.getLogger(__name__)


def run_search_job(
    job: SearchJob,
    problems: Sequence[Any],
    out: str | Path | None = None,
    *,
    ray_address: str | bool | None = None,
    num_actors: int | None = None,
    actor_options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    max_retries: int = 1,
    max_actor_restarts: int | None = None,
    stall_timeout_s: float | None = None,
    ray_init_kwargs: dict[str, Any] | None = None,
    on_event: EventHook | None = None,
    keep_records: bool = True,
    min_ready_actors: int = 1,
) -> list[Any]:
    """Search ``problems`` with ``job`` and return one ``SearchResult`` per problem (in order).

    With ``out`` the per-problem JSONL is appended as problems finish and a rerun resumes
    (ids already there are not searched again).

    Args:
        shard: ``(index, num_shards)``: only that deterministic shard of ``problems``
            (``rstar.distributed.shard.select_shard``: by a stable hash of the id).
        ray_address: ``None``: in this process with one ``Searcher`` (what ``rstar search``
            does without ``--ray``). Otherwise on Ray: ``True`` = connect to the cluster Ray
            finds (``RAY_ADDRESS``, ``ray start`` on this machine) or start a local one;
            ``"auto"`` = an existing cluster only; ``"local"`` = a new local cluster;
            ``"host:port"`` / ``"ray://host:10001"`` = that cluster. A process already
            connected (``ray.init`` called) uses its connection and keeps it.
        num_actors: actors to start (default: as many as the cluster's CPUs / GPUs hold
            with ``actor_options``, at most one per batch).
        actor_options: ``.options()`` of every actor: ``num_cpus`` (default 1), ``num_gpus``
            (default 0), ``memory``, ``resources``, ``runtime_env``, ``scheduling_strategy``...
        batch_size: problems per actor call (default: half an actor's share of the run,
            capped at ``4 * config.concurrent_trees``).
        max_retries: failed calls a problem may take part in before it is written as a
            failure record, beyond the first (after its first failure it runs alone).
        max_actor_restarts: replacements for dead actors (default unlimited; a run stops when
            too many calls in a row fail with nothing finishing, see docs/distributed.md).
        stall_timeout_s: kill an actor whose call produced no record for this long (None: never).
        ray_init_kwargs: extra ``ray.init`` arguments when this call connects.
        on_event: ``fn(kind, info)`` called by the Ray driver (``actor_ready``, ``batch``,
            ``record``, ``actor_died``, ``requeued``, ``failed``, ``batch_error``...).
        keep_records: on Ray, ``False`` makes the returned results carry a summary of each
            record (id, chosen answer, stats, failure fields) instead of the whole tree, so the
            driver's memory does not grow with the trees (the output file has them all).
            The local path always returns whole records.
        min_ready_actors: hand out the first batch only once this many actors are ready
            (fewer when fewer are alive); 1 = start with the first ready actor.
    """
    if shard is not None:
        index, num = shard
        before = len(problems)
        problems = select_shard(problems, int(index), int(num))
        logger.info("shard %d of %d: %d of %d problems", index, num, len(problems), before)
    if ray_address is None or ray_address is False:
        return run_local(job, problems, out, progress=progress)
    from rstar.distributed.ray_runner import run_ray

    results, stats = run_ray(
        job, problems, out, ray_address=ray_address, ray_init_kwargs=ray_init_kwargs, progress=progress,
        num_actors=num_actors, actor_options=actor_options, batch_size=batch_size, max_retries=max_retries,
        max_actor_restarts=max_actor_restarts, stall_timeout_s=stall_timeout_s, on_event=on_event,
        keep_records=keep_records, min_ready_actors=min_ready_actors,
    )
    logger.info("ray run: %d problems (%d resumed), %d searched, %d actors started, %d lost, %d re-queued, "
                "%d failure records, %.1f s", stats.problems, stats.resumed, stats.searched, stats.actor_starts,
                stats.actor_deaths, stats.requeued, stats.failed, stats.wall_s)
    return results
