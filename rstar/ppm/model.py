"""The process preference model: a causal-LM backbone whose LM head is a scalar value head.

Representation. The PPM *is* a one-label ``*ForSequenceClassification`` model (the backbone of
the round's policy + ``score``, a bias-free ``Linear(hidden, 1)``): that class exists for every
decoder architecture in transformers, is what Trainer / peft (``SEQ_CLS``) / FSDP / DeepSpeed
handle natively, and is what vLLM and other servers load (ecosystem.md §1.7, §4.2). Its pooling
reads the value at the last non-pad token, i.e. the last token of the scored step. A head bias
would be useless anyway: it cancels in ``r_chosen - r_rejected`` and never trains.

On disk a PPM directory is therefore a standard sequence-classification checkpoint (weights +
config + tokenizer, one directory, no separate ``value_head.bin`` as in the official code,
rstar-math.md §6.2) with one extra config entry, ``rstar_ppm`` (format version, value scale).
Loading checks that the head is really in the weights, because transformers would silently
initialise a missing ``score`` at random.

Inference value: ``tanh(r / value_scale)`` (paper: tanh in the head, scale 1; the official
serving code used 5, rstar-math.md §5.3). Training uses the raw ``r``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PPM_META_KEY = "rstar_ppm"
FORMAT_VERSION = 1
_HEAD_NAMES = ("score",)


class PPMLoadError(ValueError):
    """A directory that cannot be loaded as a PPM (no value head, wrong head shape, ...)."""


# --------------------------------------------------------------------------- checkpoint inspection


def checkpoint_tensor_names(path: str | os.PathLike[str]) -> set[str]:
    """Names of the tensors stored in a Hugging Face checkpoint directory (safetensors or
    PyTorch, sharded or not), read without loading the weights."""
    d = Path(path)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            return set(json.loads((d / index).read_text())["weight_map"])
    if (d / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
            return set(fh.keys())
    if (d / "pytorch_model.bin").is_file():
        sd = torch.load(d / "pytorch_model.bin", map_location="meta", weights_only=True, mmap=True)
        return set(sd)
    return set()


def _head_tensor(names: set[str]) -> str | None:
    for n in sorted(names):
        base = n.split(".")
        if len(base) >= 2 and base[-1] == "weight" and base[-2] in _HEAD_NAMES:
            # the top-level head (``score.weight``), not a module of the same name inside a layer
            if len(base) == 2 or base[0] in ("base_model", "model") and len(base) == 3:
                return n
    return None


def check_ppm_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a PPM directory and return its config dict; PPMLoadError says what is wrong."""
    d = Path(path)
    if not d.is_dir():
        raise PPMLoadError(f"PPM directory {d} does not exist")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise PPMLoadError(f"{d} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(cfg_file.read_text())
    names = checkpoint_tensor_names(d)
    if not names:
        raise PPMLoadError(f"{d} holds no model weights (model.safetensors / pytorch_model.bin)")
    head = _head_tensor(names)
    if head is None:
        archs = cfg.get("architectures") or []
        hint = ""
        if (d / "value_head.bin").is_file():
            hint = (
                " It holds a value_head.bin: that is the official rStar-Math layout (backbone and head"
                " saved apart), which rstar does not load; retrain with `rstar train-ppm`."
            )
        elif any(a.endswith("ForCausalLM") for a in archs):
            hint = (
                f" It is a causal-LM checkpoint ({archs[0]}), i.e. a policy. To make a PPM from it, train"
                f" one with `rstar train-ppm --model {d} ...` or initialise one with"
                f" rstar.ppm.PPM.from_policy('{d}') (the head then starts random)."
            )
        raise PPMLoadError(
            f"{d} is not a PPM: its weights have no value head (no 'score.weight' tensor).{hint}"
        )
    num_labels = len(cfg.get("id2label") or {}) or int(cfg.get("num_labels", 1))
    if num_labels != 1:
        raise PPMLoadError(f"{d}: a PPM has one output (num_labels=1), this checkpoint has {num_labels}")
    return cfg


def unwrap_model(model: Any) -> Any:
    """The transformers model under peft / DDP / compile wrappers."""
    m = model
    for _ in range(4):
        if hasattr(m, "module") and isinstance(m.module, torch.nn.Module):
            m = m.module
        elif hasattr(m, "_orig_mod"):
            m = m._orig_mod
        elif m.__class__.__name__.startswith("Peft") and hasattr(m, "get_base_model"):
            m = m.get_base_model()
        else:
            break
    return m


# --------------------------------------------------------------------------- the module


class PPM(torch.nn.Module):
    """Backbone + scalar value head; implements the ``Scorer`` protocol (``score``/``close``).

    Args:
        model: a one-label ``*ForSequenceClassification`` (possibly wrapped by peft).
        tokenizer: its tokenizer (must have a pad token).
        value_scale: inference value is ``tanh(r / value_scale)``.
        max_length: longer inputs keep their last ``max_length`` tokens (the scored step is at
            the end); default: the model's ``max_position_embeddings``.
        batch_size / max_batch_tokens: batching of ``score`` (requests sorted by length).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        value_scale: float | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        max_batch_tokens: int = 65536,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        inner = unwrap_model(model)
        if getattr(inner.config, "num_labels", 1) != 1:
            raise ValueError("a PPM model has exactly one output (num_labels=1)")
        if tokenizer.pad_token_id is None:
            raise ValueError("the PPM tokenizer needs a pad token (see rstar.train.tokens.ensure_step_tokens)")
        inner.config.pad_token_id = tokenizer.pad_token_id
        meta = dict(getattr(inner.config, PPM_META_KEY, None) or {})
        if value_scale is None:
            value_scale = float(meta.get("value_scale", 1.0))
        if not value_scale > 0:
            raise ValueError(f"value_scale must be > 0, got {value_scale}")
        self.value_scale = float(value_scale)
        meta.update({"format_version": FORMAT_VERSION, "value_scale": self.value_scale})
        setattr(inner.config, PPM_META_KEY, meta)
        self.max_length = max_length or int(getattr(inner.config, "max_position_embeddings", 0) or 0) or None
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens

    # ----------------------------------------------------------------- parts

    @property
    def hf_model(self) -> Any:
        """The unwrapped transformers sequence-classification model."""
        return unwrap_model(self.model)

    @property
    def value_head(self) -> torch.nn.Linear:
        return getattr(self.hf_model, _HEAD_NAMES[0])

    @property
    def backbone(self) -> torch.nn.Module:
        return self.hf_model.base_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------- forward / scoring

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw values ``r`` (no tanh), one per sequence: the head at the last non-pad token."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.squeeze(-1)

    def scorer(self) -> Any:
        """An ``rstar.backends.HFScorer`` over this PPM's model (same device and dtype), so PPM
        scoring shares the backends' batching, left truncation and last-token read-out."""
        from rstar.backends import HFScorer

        p = next(self.model.parameters())
        return HFScorer(
            self.hf_model,
            self.tokenizer,
            device=str(p.device),
            dtype=p.dtype,
            value_temperature=self.value_scale,
            max_model_len=self.max_length,
            max_batch_size=self.batch_size,
            max_batch_tokens=self.max_batch_tokens,
        )

    def score(self, requests: Sequence[Any]) -> list[float]:
        """Scorer protocol: ``tanh(r / value_scale)`` per request (``ScoreRequest``: prompt +
        partial solution through the step; plain strings are accepted too)."""
        from rstar.backends import ScoreRequest

        reqs = [ScoreRequest(text=r) if isinstance(r, str) else r for r in requests]
        if not reqs:
            return []
        was_training = self.model.training
        try:
            return self.scorer().score(reqs)
        finally:
            self.model.train(was_training)

    def close(self) -> None:
        """Scorer protocol; frees accelerator memory held by cached allocations."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_policy(
        cls,
        policy: str | os.PathLike[str],
        *,
        tokenizer: Any = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        value_scale: float = 1.0,
        head_init_std: float | None = None,
        add_step_tokens: bool = True,
        attn_implementation: str | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> PPM:
        """A fresh PPM initialised from a policy (causal LM) checkpoint: the backbone's weights
        are the policy's, the LM head is dropped, the value head starts random (normal with
        ``head_init_std``, default the config's ``initializer_range``)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from rstar.train.tokens import ensure_step_tokens

        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(policy)
        config = AutoConfig.from_pretrained(policy)
        try:
            AutoModelForSequenceClassification._model_mapping[type(config)]  # noqa: B018
        except KeyError as exc:
            raise PPMLoadError(
                f"{policy}: transformers has no sequence-classification class for model type "
                f"{config.model_type!r}, which the PPM needs"
            ) from exc
        if seed is not None:
            torch.manual_seed(seed)
        load_kwargs: dict[str, Any] = {"num_labels": 1, **kwargs}
        if dtype is not None:
            load_kwargs["dtype"] = _as_dtype(dtype)
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        if tok.pad_token_id is not None:
            load_kwargs["pad_token_id"] = tok.pad_token_id
        model = _quiet_load(AutoModelForSequenceClassification, policy, **load_kwargs)
        if add_step_tokens:
            ensure_step_tokens(tok, model)
        elif tok.pad_token is None:
            raise ValueError("the policy tokenizer has no pad token; use add_step_tokens=True")
        head = getattr(model, _HEAD_NAMES[0])
        std = head_init_std if head_init_std is not None else float(getattr(model.config, "initializer_range", 0.02))
        with torch.no_grad():
            head.weight.normal_(0.0, std)
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
        if device is not None:
            model.to(device)
        model.config.architectures = [type(model).__name__]
        return cls(model, tok, value_scale=value_scale)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        value_scale: float | None = None,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ) -> PPM:
        """Load a PPM directory (ours, or any one-label ``*ForSequenceClassification``).
        A directory without the value head raises PPMLoadError (never a random head)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_ppm_dir(path)
        load_kwargs: dict[str, Any] = dict(kwargs)
        if dtype is not None:
            load_kwargs["dtype"] = _as_dtype(dtype)
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, **load_kwargs)
        if device is not None:
            model.to(device)
        model.eval()
        return cls(model, tok, value_scale=value_scale)

    # ----------------------------------------------------------------- saving

    def save_pretrained(self, path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
                        merge_lora: bool = True) -> Path:
        """Write the PPM as one directory: backbone + head weights (safetensors), config (with
        ``rstar_ppm``), tokenizer. The result is a ``*ForSequenceClassification`` checkpoint that
        transformers and vLLM load as is. LoRA adapters are merged into a copy first."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        if model.__class__.__name__.startswith("Peft"):
            if not merge_lora:
                model.save_pretrained(out)
                self.tokenizer.save_pretrained(out)
                return out
            model = copy.deepcopy(model).merge_and_unload()
        model = unwrap_model(model)
        if dtype is not None and model.dtype != _as_dtype(dtype):
            model = copy.deepcopy(model).to(_as_dtype(dtype))
        cfg = model.config
        cfg.num_labels = 1
        cfg.pad_token_id = self.tokenizer.pad_token_id
        cfg.architectures = [type(model).__name__]
        setattr(cfg, PPM_META_KEY, {"format_version": FORMAT_VERSION, "value_scale": self.value_scale})
        model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        logger.info("saved PPM (%s) to %s", type(model).__name__, out)
        return out

    def export_sequence_classification(self, path: str | os.PathLike[str], *,
                                       dtype: torch.dtype | str | None = None) -> Path:
        """Export for servers (vLLM ``runner="pooling"``, TGI, transformers pipelines): a plain
        one-label ``*ForSequenceClassification`` directory with ``pad_token_id`` set, LoRA
        merged, optionally cast (e.g. ``bfloat16``). Servers return the raw ``r``; apply
        ``tanh(r / value_scale)`` (``config.rstar_ppm.value_scale``) on the client."""
        return self.save_pretrained(path, dtype=dtype, merge_lora=True)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return getattr(torch, str(dtype))
    except AttributeError as exc:
        raise ValueError(f"unknown dtype {dtype!r}") from exc


def _quiet_load(cls: Any, path: Any, **kwargs: Any) -> Any:
    """from_pretrained without the expected 'score.weight newly initialized' warning."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def ppm_value_scale(path: str | os.PathLike[str]) -> float:
    """The ``value_scale`` recorded in a PPM directory's config (1.0 when absent)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return float((cfg.get(PPM_META_KEY) or {}).get("value_scale", 1.0))


def load_scorer(path: str | os.PathLike[str], backend: str = "hf", **kwargs: Any) -> Any:
    """A ``Scorer`` for a PPM directory on the chosen backend (``"hf"`` -> ``HFScorer``,
    ``"vllm"`` -> ``VLLMScorer``), checked for its value head and with ``value_temperature``
    taken from the directory's ``rstar_ppm.value_scale`` unless given. This is how the search
    should open a PPM, so training and inference apply the same tanh scale."""
    from rstar.backends import HFScorer, VLLMScorer

    check_ppm_dir(path)
    kwargs.setdefault("value_temperature", ppm_value_scale(path))
    if backend == "hf":
        return HFScorer(str(path), **kwargs)
    if backend == "vllm":
        return VLLMScorer(str(path), **kwargs)
    raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
