"""Tiny Qwen2 models and tokenizers built on the fly (no model hub is reachable).

Builds are cached in the target directory (a marker file records the parameters) and are
atomic: a build goes into a temporary sibling directory that is renamed into place, under a
file lock, so concurrent test sessions never see a half-written model."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STEP_TOKENS: tuple[str, ...] = (
    "<code>",
    "<end_of_step>",
    "<end_of_code>",
    "<output>",
    "<end_of_output>",
    "<answer>",
    "<end_of_answer>",
    "<|user|>",
    "<|assistant|>",
)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_MARKER = "rstar_tiny_build.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines a build; its hash is the cache key."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    train_steps: int = 250
    seed: int = 0
    corpus_digest: str = ""
    kind: str = "causal_lm"
    format_version: int = _FORMAT_VERSION


def _corpus_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _read_marker(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / _MARKER).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_build(out_dir: Path, spec: TinyModelSpec, build: Any) -> Path:
    """Return out_dir if it holds a build of ``spec``; otherwise run ``build(tmp_dir)`` and move
    the result into place atomically."""
    out_dir = Path(out_dir).resolve()
    want = asdict(spec)
    if _read_marker(out_dir) == want:
        return out_dir
    with _lock(out_dir.parent / f".{out_dir.name}.lock"):
        if _read_marker(out_dir) == want:  # built by a concurrent session while we waited
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps(want, indent=1, sort_keys=True))
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
                os.rename(out_dir, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("built tiny %s in %s", spec.kind, out_dir)
    return out_dir


# Qwen2's pre-tokenizer split (digits one by one). transformers >= 5 rebuilds a Qwen2 model's
# tokenizer with this split and an NFC normalizer whatever tokenizer.json says, so the tokenizer
# is trained with exactly that pipeline: then HF, vLLM and the raw ``tokenizers`` file agree.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (Qwen2 pipeline) with the rStar step tokens as single special
    tokens, so stop strings map to single ids as in rStar-Math's SFT models."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = [EOS_TOKEN, PAD_TOKEN, *STEP_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=list(STEP_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        padding_side="left",
    )
    # Round-trip through save/load as a Qwen2 tokenizer so the returned object is exactly what
    # AutoTokenizer gives users of the saved directory.
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg_path = Path(d) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "Qwen2Tokenizer"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        return AutoTokenizer.from_pretrained(d)


def _config(spec: TinyModelSpec, tokenizer: Any, **extra: Any) -> Any:
    from transformers import Qwen2Config

    vocab = len(tokenizer)
    vocab = int(math.ceil(vocab / 64) * 64)  # round up: some kernels prefer aligned vocab sizes
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _train_briefly(model: Any, tokenizer: Any, texts: list[str], steps: int, seed: int) -> None:
    """A few hundred AdamW steps on packed corpus text: enough that samples look like rStar
    steps and end at the step tokens, and that greedy argmaxes are not near-ties (so HF and vLLM
    agree), while staying a few seconds on a laptop CPU."""
    import torch

    if steps <= 0:
        return
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    seq, batch = 128, 8
    data = torch.tensor(ids[: (len(ids) // seq) * seq]).view(-1, seq)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    loss = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention on shared CPUs
    try:
        for _ in range(steps):
            rows = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
            loss = model(input_ids=rows, labels=rows).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    logger.info("tiny model trained %d steps, final loss %.3f", steps, loss.item() if loss is not None else float("nan"))


def _solutions_only(texts: list[str]) -> list[str]:
    from rstar.testing.corpus import SFT_PROMPT

    marker = SFT_PROMPT.split("{question}")[0]
    sols = [t for t in texts if t.startswith(marker)]
    return sols or texts


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    max_position_embeddings: int = 1024,
    train_steps: int = 250,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Build (or return the cached build of) a tiny Qwen2 causal LM + byte-level BPE tokenizer.

    The directory loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and in vLLM. Weights
    are random, then ``train_steps`` quick steps on the corpus (0 = purely random). The default
    head count gives head_dim 32: vLLM's CPU attention supports head sizes >= 32 only.
    ``corpus`` defaults to generated rStar-format solutions plus the shared benchmark questions
    when present; the model trains on the generated solutions only."""
    from rstar.testing.corpus import default_corpus

    texts = list(corpus) if corpus is not None else list(default_corpus(seed))
    spec = TinyModelSpec(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        train_steps=train_steps,
        seed=seed,
        corpus_digest=_corpus_digest(texts),
    )

    def build(tmp: Path) -> None:
        import torch
        from transformers import GenerationConfig, Qwen2ForCausalLM

        tokenizer = train_tokenizer(texts, vocab_size)
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(_config(spec, tokenizer)).float()
        _train_briefly(model, tokenizer, _solutions_only(texts), train_steps, seed)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(Path(out_dir), spec, build)


def build_tiny_classifier(
    out_dir: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    **model_kwargs: Any,
) -> Path:
    """A one-label ``Qwen2ForSequenceClassification`` of the tiny model's shape (a PPM-like
    scorer fixture): backbone from the tiny causal LM (built next to out_dir unless ``base_dir``
    is given), score head random with std 1/sqrt(hidden) so raw values spread around O(1)."""
    out_dir = Path(out_dir)
    base = Path(base_dir) if base_dir is not None else build_tiny_model(
        out_dir.parent / f"{out_dir.name}-base", seed=seed, **model_kwargs
    )
    base_marker = _read_marker(base) or {}
    spec = TinyModelSpec(
        **{k: v for k, v in base_marker.items() if k in TinyModelSpec.__dataclass_fields__ and k not in ("kind", "seed")},
        seed=seed,
        kind="seq_cls",
    )

    def build(tmp: Path) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoTokenizer, Qwen2ForSequenceClassification

        tokenizer = AutoTokenizer.from_pretrained(base)
        config = AutoConfig.from_pretrained(base)
        config.num_labels = 1
        config.architectures = ["Qwen2ForSequenceClassification"]
        model = Qwen2ForSequenceClassification(config).float()
        lm_state = load_file(str(base / "model.safetensors"))
        backbone = {k: v for k, v in lm_state.items() if k.startswith("model.")}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        if unexpected or set(missing) != {"score.weight"}:
            raise RuntimeError(f"tiny classifier: unexpected weights {unexpected}, missing {missing}")
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            w = torch.randn(model.score.weight.shape, generator=g) / math.sqrt(config.hidden_size)
            model.score.weight.copy_(w)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(out_dir, spec, build)
