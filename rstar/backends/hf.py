"""transformers backends: ``HFGenerator`` (batched KV-cache sampling) and ``HFScorer``.

This is the backend wherever vLLM is absent (CPU machines, and GPU machines whose image has
torch + transformers only), so it batches as hard as a plain PyTorch loop can: requests are
grouped by prompt length, each distinct prompt is prefilled once and its KV cache is fanned out
to its ``n`` samples, finished rows are dropped from the batch as they stop, and concurrent
``agenerate`` calls are gathered into shared batches by a small micro-batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rstar.backends.base import (
    Completion,
    GenerationRequest,
    ScoreRequest,
    dedup_completions,
    find_stop,
    prompt_token_ids,
    truncate_left,
)

logger = logging.getLogger(__name__)


@dataclass
class HFGeneratorConfig:
    """Settings of ``HFGenerator``; ``None`` means: pick from the hardware / the model."""

    device: str | None = None  # "cuda" when available, else "cpu"
    dtype: str | None = None  # "bfloat16" on GPU, "float32" on CPU
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_batch_size: int = 256  # sequences (prompts x samples) decoded together
    max_batch_tokens: int = 262_144  # cap on rows x (prompt + new tokens) per batch
    batch_wait_ms: float = 5.0  # how long agenerate gathers concurrent requests
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    seed: int | None = None  # makes unseeded requests reproducible across runs
    shrink_fraction: float = 0.25  # drop finished rows once this share of the batch is done


def _resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[Any, Any]:
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return dev, dt


def fit_to_context(ids: list[int], max_new_tokens: int, max_model_len: int) -> tuple[list[int], int]:
    """Prompt ids and a token budget that fit ``max_model_len``: the prompt keeps room for
    ``max_new_tokens`` but never less than half the context; the left end is what is dropped."""
    if not ids:
        raise ValueError("empty prompt")
    budget = max(max_model_len - max_new_tokens, max_model_len // 2)
    ids = truncate_left(ids, budget)
    return ids, min(max_new_tokens, max_model_len - len(ids))


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _row_key(seed: int, sample: int) -> int:
    """A 64-bit key per (request seed, sample index)."""
    return _splitmix64_int((seed * _GOLDEN + sample) & _MASK64)


def _splitmix64_int(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniforms(keys: Any, steps: Any) -> Any:
    """Counter-based uniforms in [0, 1): splitmix64(key + step * golden), vectorised in numpy.
    A sample's random stream depends only on its key and position, so seeded requests give
    the same samples whatever batch they share, with no per-row generator objects."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = keys + steps * np.uint64(_GOLDEN) + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class _Row:
    req: int
    sample: int
    temperature: float
    top_p: float
    max_new: int
    stops: tuple[str, ...]
    stop_ids: dict[int, str]
    key: int  # 64-bit random-stream key: per-sample randomness independent of batch composition
    ids: list[int] = field(default_factory=list)
    done: bool = False
    finish: str = ""
    stop: str | None = None


def _preallocate(cache: Any, capacity: int) -> None:
    """Swap the plain layers of a ``DynamicCache`` for ``_PreallocatedLayer``s (sliding-window
    and other special layers are left alone)."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = _PreallocatedLayer(capacity)


def _preallocated_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A ``DynamicLayer`` that writes each step into a buffer sized for the whole decode.

        The stock layer concatenates the whole cache with every new token (quadratic copying:
        most of a small model's decoding time on CPU); here a step writes its slot in place and
        ``keys``/``values`` are views of the filled part. Reordering (fan-out of a prompt to its
        samples, dropping finished rows) selects rows of the buffer."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = max(1, int(capacity))
            self.length = 0

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            import torch

            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self._kbuf = torch.empty((b, h, self.capacity, d), dtype=self.dtype, device=self.device)
            self._vbuf = torch.empty((b, h, self.capacity, value_states.shape[-1]), dtype=self.dtype,
                                     device=self.device)
            self.length = 0
            self._views()
            self.is_initialized = True

        def _views(self) -> None:
            self.keys = self._kbuf[:, :, : self.length]
            self.values = self._vbuf[:, :, : self.length]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            import torch

            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:  # longer than planned: grow geometrically
                self.capacity = max(end, 2 * self.capacity)
                kb = torch.empty((*self._kbuf.shape[:2], self.capacity, self._kbuf.shape[3]),
                                 dtype=self.dtype, device=self.device)
                vb = torch.empty((*self._vbuf.shape[:2], self.capacity, self._vbuf.shape[3]),
                                 dtype=self.dtype, device=self.device)
                kb[:, :, : self.length] = self._kbuf[:, :, : self.length]
                vb[:, :, : self.length] = self._vbuf[:, :, : self.length]
                self._kbuf, self._vbuf = kb, vb
            self._kbuf[:, :, self.length : end] = key_states
            self._vbuf[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def reorder_cache(self, beam_idx: Any) -> None:
            if self.is_initialized:
                idx = beam_idx.to(self.device)
                self._kbuf = self._kbuf.index_select(0, idx)
                self._vbuf = self._vbuf.index_select(0, idx)
                self._views()

        def batch_select_indices(self, indices: Any) -> None:
            if self.is_initialized:
                self._kbuf = self._kbuf[indices, ...]
                self._vbuf = self._vbuf[indices, ...]
                self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._kbuf = self._kbuf.repeat_interleave(repeats, dim=0)
                self._vbuf = self._vbuf.repeat_interleave(repeats, dim=0)
                self._views()

        def reset(self) -> None:
            self.length = 0
            self.keys = self.values = None
            self.is_initialized = False

        def crop(self, tokens_to_remove: int) -> None:
            if self.is_initialized:
                self.length = max(0, self.length - tokens_to_remove if tokens_to_remove > 0
                                  else self.length + tokens_to_remove)
                self._views()

    return PreallocatedLayer


class _LazyLayerClass:
    """Builds the cache-layer class on first use, so importing this module needs no torch."""

    cls: type | None = None

    def __call__(self, capacity: int) -> Any:
        if _LazyLayerClass.cls is None:
            _LazyLayerClass.cls = _preallocated_layer_class()
        return _LazyLayerClass.cls(capacity)


_PreallocatedLayer = _LazyLayerClass()


class HFGenerator:
    """``Generator`` on transformers: any causal LM directory / hub name, CPU or GPU."""

    def __init__(
        self,
        model: str | Any,
        tokenizer: str | Any | None = None,
        config: HFGeneratorConfig | None = None,
        **overrides: Any,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = dataclasses.replace(config or HFGeneratorConfig(), **overrides)
        self.config = cfg
        self.device, self.dtype = _resolve_device_dtype(cfg.device, cfg.dtype)
        if isinstance(model, str):
            kwargs: dict[str, Any] = {"dtype": self.dtype, "trust_remote_code": cfg.trust_remote_code}
            if cfg.attn_implementation:
                kwargs["attn_implementation"] = cfg.attn_implementation
            self.model = AutoModelForCausalLM.from_pretrained(model, **kwargs).to(self.device)
            tokenizer = tokenizer if tokenizer is not None else model
        else:
            self.model = model.to(self.device)
            if tokenizer is None:
                raise ValueError("HFGenerator(model=<module>) needs a tokenizer")
        self.model.eval()
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = tokenizer
        mc = self.model.config
        self.max_model_len = int(cfg.max_model_len or getattr(mc, "max_position_embeddings", 4096))
        eos = getattr(self.model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        self._lock = threading.Lock()  # one forward loop at a time on the model
        self._rng = random.Random(cfg.seed)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfgen")
        self._pending: list[tuple[GenerationRequest, bool, asyncio.Future[list[Completion]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._torch = torch
        self.stats = {"batches": 0, "forward_steps": 0, "generated_tokens": 0}

    # ------------------------------------------------------------------ public API
    def generate(self, requests: Sequence[GenerationRequest], *, dedup: bool = False) -> list[list[Completion]]:
        """All requests at once, batched by prompt length; completions in sample order."""
        with self._lock:
            out = self._generate(list(requests))
        return [dedup_completions(c) if dedup else c for c in out]

    async def agenerate(self, request: GenerationRequest, *, dedup: bool = False) -> list[Completion]:
        """One request; concurrent calls made within ``batch_wait_ms`` (and all calls made
        while a batch is running) are decoded together in one batch on a worker thread."""
        return await self.submit(request, dedup=dedup)

    def submit(self, request: GenerationRequest, *, dedup: bool = False) -> asyncio.Future[list[Completion]]:
        """``agenerate`` without the coroutine: the future (on the running loop) it awaits."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (e.g. a second asyncio.run)
            self._loop, self._pending, self._flusher = loop, [], None
        fut: asyncio.Future[list[Completion]] = loop.create_future()
        self._pending.append((request, dedup, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        return fut

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    # ------------------------------------------------------------------ micro-batcher
    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            await asyncio.sleep(self.config.batch_wait_ms / 1000.0)
            batch, self._pending = self._pending, []
            live = [(r, d, f) for r, d, f in batch if not f.cancelled()]
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.generate, [r for r, _, _ in live])
            except Exception as exc:
                if len(live) == 1:
                    if not live[0][2].done():
                        live[0][2].set_exception(exc)
                    continue
                # one bad request must not fail its batch-mates: rerun them one by one
                results = []
                for r, _, f in live:
                    try:
                        results.append((await loop.run_in_executor(self._executor, self.generate, [r]))[0])
                    except Exception as one_exc:
                        results.append(one_exc)
            for (_, d, f), res in zip(live, results):
                if f.done():
                    continue
                if isinstance(res, Exception):
                    f.set_exception(res)
                else:
                    f.set_result(dedup_completions(res) if d else res)

    # ------------------------------------------------------------------ core loop
    def _stop_ids(self, stops: tuple[str, ...]) -> dict[int, str]:
        """Stop strings that are single tokens (the rStar step tags): matched by id, no decode."""
        out = {}
        for s in stops:
            ids = self.tokenizer.encode(s, add_special_tokens=False)
            if len(ids) == 1:
                out[ids[0]] = s
        return out

    def _generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        prompts: list[list[int]] = []
        rows_by_req: list[list[_Row]] = []
        for i, r in enumerate(requests):
            ids = prompt_token_ids(r, self.tokenizer)
            ids, max_new = fit_to_context(ids, r.max_new_tokens, self.max_model_len)
            prompts.append(ids)
            stop_ids = self._stop_ids(r.stop)
            base = r.seed if r.seed is not None else self._rng.getrandbits(62)
            rows = []
            for j in range(r.n):
                rows.append(_Row(i, j, r.temperature, r.top_p, max_new, r.stop, stop_ids, _row_key(base, j)))
            rows_by_req.append(rows)
        # units: (request, its rows); a request with more samples than a batch holds is split
        cap = max(1, self.config.max_batch_size)
        units = [(i, rows[k : k + cap]) for i, rows in enumerate(rows_by_req) for k in range(0, len(rows), cap)]
        units.sort(key=lambda u: len(prompts[u[0]]))
        group: list[tuple[int, list[_Row]]] = []
        n_rows = 0
        for u in units:
            longest = len(prompts[u[0]]) + max(r.max_new for r in u[1])
            if group and (
                n_rows + len(u[1]) > cap or (n_rows + len(u[1])) * longest > self.config.max_batch_tokens
            ):
                self._decode_group(group, prompts)
                group, n_rows = [], 0
            group.append(u)
            n_rows += len(u[1])
        if group:
            self._decode_group(group, prompts)
        return [[self._completion(row) for row in rows] for rows in rows_by_req]

    def _completion(self, row: _Row) -> Completion:
        decode = self.tokenizer.decode
        if row.finish == "eos":
            text = decode(row.ids[:-1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        else:
            text = decode(row.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if row.finish == "stop":
            hit = find_stop(text, row.stops)
            if hit is not None:
                text = text[: hit[1]]
        return Completion(text=text, token_ids=list(row.ids), stop=row.stop, finish_reason=row.finish)

    def _decode_group(self, group: list[tuple[int, list[_Row]]], prompts: list[list[int]]) -> None:
        torch = self._torch
        from transformers import DynamicCache

        dev = self.device
        p_ids = [prompts[i] for i, _ in group]
        width = max(len(p) for p in p_ids)
        inp = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(group), width), dtype=torch.long)
        for k, p in enumerate(p_ids):
            inp[k, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            att[k, width - len(p) :] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        inp, att, pos = inp.to(dev), att.to(dev), pos.to(dev)
        cache = DynamicCache(config=self.model.config)
        longest = width + max(r.max_new for _, rows in group for r in rows)
        _preallocate(cache, longest)
        with torch.inference_mode():
            out = self.model(
                input_ids=inp,
                attention_mask=att,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            # fan each prompt's KV cache out to its samples: one prefill per distinct prompt
            fan = torch.tensor([k for k, (_, rows) in enumerate(group) for _ in rows], device=dev)
            rows = [r for _, rs in group for r in rs]
            cache = out.past_key_values
            cache.reorder_cache(fan)
            logits = out.logits[:, -1, :].index_select(0, fan)
            att = att.index_select(0, fan)
            next_pos = pos[:, -1].index_select(0, fan) + 1
            self.stats["batches"] += 1
            while True:
                tokens = self._sample(logits, rows)
                self._advance(rows, tokens)
                live = [k for k, r in enumerate(rows) if not r.done]
                if not live:
                    break
                if len(rows) - len(live) >= max(1, int(self.config.shrink_fraction * len(rows))):
                    keep = torch.tensor(live, device=dev)
                    cache.reorder_cache(keep)
                    att, next_pos = att.index_select(0, keep), next_pos.index_select(0, keep)
                    tokens = [tokens[k] for k in live]
                    rows = [rows[k] for k in live]
                step_in = torch.tensor(
                    [t if not r.done else self.pad_id for t, r in zip(tokens, rows)], device=dev
                ).unsqueeze(1)
                att = torch.cat([att, torch.ones((len(rows), 1), dtype=att.dtype, device=dev)], dim=1)
                out = self.model(
                    input_ids=step_in,
                    attention_mask=att,
                    position_ids=next_pos.unsqueeze(1),
                    past_key_values=cache,
                    use_cache=True,
                )
                cache = out.past_key_values
                logits = out.logits[:, -1, :]
                next_pos = next_pos + 1
                self.stats["forward_steps"] += 1

    def _sample(self, logits: Any, rows: list[_Row]) -> list[int]:
        """Greedy (temperature 0) or temperature + top-p sampling, vectorised over rows; the
        randomness is one counter-based uniform per row and step (inverse-CDF draw), so a
        seeded request gives the same samples whatever else shares its batch."""
        torch = self._torch
        logits = logits.float()
        greedy = [r.temperature == 0 or r.done for r in rows]
        if all(greedy):
            return logits.argmax(-1).tolist()
        dev = logits.device
        temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], device=dev)
        top_p = torch.tensor([r.top_p for r in rows], device=dev)
        keys = np.fromiter((r.key for r in rows), dtype=np.uint64, count=len(rows))
        steps = np.fromiter((len(r.ids) for r in rows), dtype=np.uint64, count=len(rows))
        u = torch.from_numpy(_uniforms(keys, steps)).to(device=dev, dtype=torch.float32)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        if any(r.top_p < 1.0 for r in rows):  # the nucleus needs probabilities in sorted order
            sp, si = probs.sort(dim=-1, descending=True)
            cum = sp.cumsum(-1)
            sp = sp.masked_fill((cum - sp) >= top_p[:, None], 0.0)  # the top token always stays
        else:  # no sort over the vocabulary: inverse CDF in id order
            sp, si = probs, None
        cum = sp.cumsum(-1)
        target = (u * cum[:, -1]).unsqueeze(1)
        k = torch.searchsorted(cum, target, right=True)
        if si is not None:
            k = torch.minimum(k, (sp > 0).sum(-1, keepdim=True) - 1)  # never past the nucleus (u ~ 1)
            sampled = si.gather(1, k).squeeze(1)
        else:  # u ~ 1 may land past the last token with mass: step back to it
            last = torch.where(sp > 0, torch.arange(sp.shape[-1], device=dev), 0).amax(-1, keepdim=True)
            sampled = torch.minimum(k, last).squeeze(1)
        g = torch.tensor(greedy, device=dev)
        return torch.where(g, logits.argmax(-1), sampled).tolist()

    def _advance(self, rows: list[_Row], tokens: list[int]) -> None:
        need_text: list[_Row] = []
        for r, t in zip(rows, tokens):
            if r.done:
                continue
            r.ids.append(int(t))
            self.stats["generated_tokens"] += 1
            if t in self.eos_ids:
                r.done, r.finish = True, "eos"
            elif t in r.stop_ids:
                r.done, r.finish, r.stop = True, "stop", r.stop_ids[t]
            elif r.stops:
                need_text.append(r)
                continue
            if not r.done and len(r.ids) >= r.max_new:
                r.done, r.finish = True, "length"
        if need_text:
            # any stop string that completed now ends inside the newest token, so a short tail
            # window is enough (byte-level tokens: at most 4 tokens per character, plus slack)
            tails = []
            for r in need_text:
                w = 4 * max(len(s) for s in r.stops) + 4
                tails.append(r.ids[-w:])
            texts = self.tokenizer.batch_decode(
                tails, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            for r, text in zip(need_text, texts):
                hit = find_stop(text, r.stops)
                if hit is not None:
                    r.done, r.finish, r.stop = True, "stop", hit[0]
                elif len(r.ids) >= r.max_new:
                    r.done, r.finish = True, "length"


@dataclass
class HFScorerConfig:
    device: str | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    max_batch_size: int = 64
    max_batch_tokens: int = 65_536  # rows x padded length per forward
    value_temperature: float = 1.0  # value = tanh(raw / value_temperature)
    trust_remote_code: bool = False


class HFScorer:
    """``Scorer`` on torch: a one-label ``*ForSequenceClassification`` (path or module), or any
    ``backbone`` returning per-token hidden states plus a ``head`` mapping them to one number.

    The value is read at the last token of each request (right padding, explicit lengths, so
    no dependence on pad-token conventions), then ``tanh`` is applied."""

    def __init__(
        self,
        model: str | Any,
        tokenizer: str | Any | None = None,
        *,
        head: Callable[[Any], Any] | None = None,
        config: HFScorerConfig | None = None,
        **overrides: Any,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        cfg = dataclasses.replace(config or HFScorerConfig(), **overrides)
        self.config = cfg
        self.device, self.dtype = _resolve_device_dtype(cfg.device, cfg.dtype)
        self._torch = torch
        if isinstance(model, str):
            model = AutoModelForSequenceClassification.from_pretrained(
                model, dtype=self.dtype, trust_remote_code=cfg.trust_remote_code
            )
            tokenizer = tokenizer if tokenizer is not None else model.name_or_path
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = tokenizer
        if head is None:
            score = getattr(model, "score", None)
            base = getattr(model, "base_model", None)
            if score is None or base is None or base is model:
                raise ValueError(
                    "HFScorer needs a *ForSequenceClassification with a `score` head, or backbone + head="
                )
            if getattr(score, "out_features", 1) != 1:
                raise ValueError(f"value head must have one output, has {score.out_features}")
            self.backbone, self.head = base, score
            self._owned = [model]
        else:
            self.backbone, self.head = model, head
            self._owned = [m for m in (model, head) if isinstance(m, torch.nn.Module)]
        for m in self._owned:
            m.to(device=self.device, dtype=self.dtype).eval()
        mc = getattr(self.backbone, "config", None)
        self.max_model_len = int(cfg.max_model_len or getattr(mc, "max_position_embeddings", 4096))

    def _hidden(self, input_ids: Any, attention_mask: Any) -> Any:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        if isinstance(out, (tuple, list)):
            return out[0]
        return out

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        """tanh(value) per request, in request order; batches are formed by length."""
        torch = self._torch
        ids = [truncate_left(prompt_token_ids(r, self.tokenizer), self.max_model_len, "score input") for r in requests]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [math.nan] * len(ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch: list[int] = []

        def run(batch: list[int]) -> None:
            width = max(len(ids[i]) for i in batch)
            inp = torch.full((len(batch), width), pad, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            for k, i in enumerate(batch):
                inp[k, : len(ids[i])] = torch.tensor(ids[i])
                att[k, : len(ids[i])] = 1
            last = torch.tensor([len(ids[i]) - 1 for i in batch], device=self.device)
            with torch.inference_mode():
                h = self._hidden(inp.to(self.device), att.to(self.device))
                h_last = h[torch.arange(len(batch), device=self.device), last]
                raw = self.head(h_last).float().reshape(len(batch), -1)[:, 0]
                vals = torch.tanh(raw / self.config.value_temperature).tolist()
            for i, v in zip(batch, vals):
                out[i] = v

        for i in order:
            if batch and (
                len(batch) >= self.config.max_batch_size
                or (len(batch) + 1) * len(ids[i]) > self.config.max_batch_tokens
            ):
                run(batch)
                batch = []
            batch.append(i)
        if batch:
            run(batch)
        return out

    def close(self) -> None:
        self._owned = []
        self.backbone = self.head = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()
