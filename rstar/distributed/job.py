"""A search job as data, and the one function that turns it into a running ``Searcher``.

``SearchJob`` says everything a process needs to search problems: the policy, the PPM, the
backend and its options, the ``SearchConfig`` and the seed. It is plain picklable data, so the
same object drives a local run (``rstar search``), a Ray actor on another machine
(``rstar search --ray``) and the search stage of ``rstar evolve``. ``build_searcher(job)``
builds generator + scorer + ``Searcher`` in the current process; the local path and every
Ray actor go through it, so there is no second implementation of the search.

Nothing here imports torch, vLLM or Ray at import time."""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rstar.search.config import SearchConfig
from rstar.search.driver import Searcher

logger = logging.getLogger(__name__)


@dataclass
class SearchJob:
    """Everything needed to search problems, as picklable data.

    Attributes:
        model: policy model directory (or hub name) for the generator.
        config: the search config (mode, n, rollouts, pipeline, ...).
        ppm: PPM directory, required by PPM-guided configs (``config.needs_scorer``).
        backend: ``hf`` (transformers) or ``vllm`` for the generator; the PPM uses the same
            backend (vLLM scorer when available, else transformers).
        backend_kwargs: options of the generator (``HFGeneratorConfig`` / ``VLLMConfig``
            fields, e.g. ``{"gpu_memory_utilization": 0.45}``).
        scorer_kwargs: options of the scorer (``HFScorerConfig`` / ``VLLMConfig`` fields).
        seed: when set, replaces ``config.seed`` (request seeds derive from it, the problem id,
            the leaf and the expansion count, so results do not depend on who searches).
        torch_threads: ``torch.set_num_threads`` in the searching process (None: leave it).
        factory: ``"module:function"`` (or a callable) that builds the components instead of
            the backends: called as ``factory(job)``, returns a ``SearchComponents``. For
            other backends (HTTP servers, test doubles); it must be importable where the job
            runs (on every Ray node).
    """

    model: str
    config: SearchConfig = field(default_factory=SearchConfig)
    ppm: str | None = None
    backend: Literal["hf", "vllm"] = "hf"
    backend_kwargs: dict[str, Any] = field(default_factory=dict)
    scorer_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    torch_threads: int | None = None
    factory: str | Callable[[SearchJob], SearchComponents] | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"backend must be 'hf' or 'vllm', got {self.backend!r}")
        if self.factory is None and self.config.needs_scorer and not self.ppm:
            raise ValueError(
                f"mode={self.config.mode} value={self.config.value} vote={self.config.vote} needs a PPM: set ppm"
            )

    def search_config(self) -> SearchConfig:
        """The config the searcher runs: ``config`` with ``seed`` applied."""
        if self.seed is None or self.seed == self.config.seed:
            return self.config
        return dataclasses.replace(self.config, seed=int(self.seed))


@dataclass
class SearchComponents:
    """What a ``Searcher`` is built from. ``close`` closes the generator and scorer (and the
    sandbox / grader when given here; ``None`` lets the Searcher create and own its own)."""

    generator: Any
    scorer: Any = None
    sandbox: Any = None
    grader: Any = None

    def close(self) -> None:
        for obj in (self.generator, self.scorer, self.sandbox, self.grader):
            close = getattr(obj, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing must go on for the others
                    logger.exception("closing %s failed", type(obj).__name__)


def make_generator(backend: str, model: str, **kwargs: Any) -> Any:
    """The policy generator of ``backend`` (``hf`` | ``vllm``)."""
    if backend == "vllm":
        from rstar.backends import VLLMGenerator

        return VLLMGenerator(model, **kwargs)
    from rstar.backends import HFGenerator

    return HFGenerator(model, **kwargs)


def make_scorer(backend: str, path: str, **kwargs: Any) -> Any:
    """The PPM scorer, opened with ``rstar.ppm.load_scorer`` (value head checked, the
    training tanh scale applied): vLLM's when ``backend == "vllm"`` and vLLM can load,
    else transformers."""
    from rstar.ppm.model import load_scorer

    if backend == "vllm":
        try:
            return load_scorer(path, "vllm", **kwargs)
        except ImportError:
            logger.warning("no vLLM scorer available: scoring with transformers")
            kwargs = {}
    return load_scorer(path, "hf", **kwargs)


def _resolve(factory: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(factory):
        return factory
    mod, sep, name = str(factory).partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"factory must be 'module:function', got {factory!r}")
    return getattr(importlib.import_module(mod), name)


def build_components(job: SearchJob) -> SearchComponents:
    """Generator and scorer of ``job`` in this process (torch threads set first)."""
    if job.torch_threads is not None:
        try:
            import torch

            torch.set_num_threads(int(job.torch_threads))
        except ImportError:  # a factory job may not need torch at all
            pass
    if job.factory is not None:
        comps = _resolve(job.factory)(job)
        if not isinstance(comps, SearchComponents):
            raise TypeError(f"factory {job.factory!r} returned {type(comps).__name__}, not SearchComponents")
        return comps
    gen = make_generator(job.backend, job.model, **job.backend_kwargs)
    try:
        scorer = make_scorer(job.backend, job.ppm, **job.scorer_kwargs) if job.ppm else None
    except BaseException:
        gen.close()
        raise
    return SearchComponents(gen, scorer)


def build_searcher(job: SearchJob, components: SearchComponents | None = None) -> Any:
    """A ``Searcher`` over ``components`` (built from ``job`` when None); the Ray actors
    stream records through its ``on_record``. Closing the searcher closes what it created
    (sandbox, grader), not the components."""
    comps = components if components is not None else build_components(job)
    return Searcher(comps.generator, comps.scorer, job.search_config(),
                    sandbox=comps.sandbox, grader=comps.grader)


def run_local(job: SearchJob, problems: Any, out: Any = None, *, progress: bool = True,
              components: SearchComponents | None = None) -> list[Any]:
    """Search ``problems`` in this process (what ``rstar search`` does without ``--ray``):
    resumable when ``out`` is given. Closes the components it built."""
    comps = components if components is not None else build_components(job)
    try:
        with build_searcher(job, comps) as s:
            return s.run(problems, out, progress=progress)
    finally:
        if components is None:
            comps.close()
