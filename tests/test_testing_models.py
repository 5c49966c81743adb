"""rstar.testing: the tiny locally built models load as ordinary HF checkpoints, keep the rStar
step tags as single tokens, and are built once, atomically."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rstar.testing import STEP_TOKENS, build_tiny_classifier, build_tiny_model  # noqa: E402
from rstar.testing.corpus import benchmark_questions, generated_solutions  # noqa: E402

SMALL_CORPUS = generated_solutions(60, seed=5)


def test_loads_with_auto_classes(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2" and type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32
    assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM's CPU attention needs head_dim >= 32
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 2_000_000
    assert len(tok) <= cfg.vocab_size
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.padding_side == "left"


def test_step_tokens_are_single_tokens(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = set()
    for s in STEP_TOKENS:
        enc = tok.encode(s, add_special_tokens=False)
        assert len(enc) == 1, (s, enc)
        assert tok.decode(enc, skip_special_tokens=False) == s
        ids.add(enc[0])
    assert len(ids) == len(STEP_TOKENS)
    # inside running text too, and never glued to neighbours
    text = "x = 1\n<end_of_step>\n\n# Step 2<end_of_code>"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<end_of_step>") in enc
    assert tok.convert_tokens_to_ids("<end_of_code>") == enc[-1]


def test_tokenizer_round_trips_and_matches_raw_file(tiny_model_dir: Path) -> None:
    """AutoTokenizer (which transformers 5 rebuilds as Qwen2Tokenizer) and the raw
    tokenizer.json must agree, or HF and vLLM would see different ids."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    texts = generated_solutions(20, seed=9) + ["héllo ∑ 😀\t 3.14159  x<answer>\\boxed{7}<end_of_answer>"]
    texts += benchmark_questions(limit=50)
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        assert ids == raw.encode(t, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == t


def test_samples_look_like_rstar_steps(tiny_model_dir: Path) -> None:
    """The brief training makes the model emit steps that end at <end_of_step> (what the
    backend and search tests rely on)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rstar.testing.corpus import SFT_PROMPT

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(SFT_PROMPT.format(question="What is 3 plus 4?") + "<code>\n", return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=40)
    text = tok.decode(out[0, ids.shape[1] :])
    assert text.startswith("# Step 1:") and "<end_of_step>" in text


def test_build_is_cached(tiny_model_dir: Path) -> None:
    stamp = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    again = build_tiny_model(tiny_model_dir)
    assert time.perf_counter() - t < 5.0
    assert again == tiny_model_dir
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def _build_small(out: str, seed: int) -> str:
    return str(build_tiny_model(out, corpus=SMALL_CORPUS, train_steps=0, seed=seed, vocab_size=300))


def test_rebuilds_when_parameters_change(tmp_path: Path) -> None:
    d = tmp_path / "m"
    _build_small(str(d), 0)
    spec0 = json.loads((d / "rstar_tiny_build.json").read_text())
    w0 = (d / "model.safetensors").read_bytes()
    _build_small(str(d), 1)
    spec1 = json.loads((d / "rstar_tiny_build.json").read_text())
    assert spec0["seed"] == 0 and spec1["seed"] == 1
    assert (d / "model.safetensors").read_bytes() != w0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["m"]


def test_concurrent_builds_are_atomic(tmp_path: Path) -> None:
    """Concurrent builders of the same model (threads here: the flock is per open file, so
    they exclude each other exactly as separate test sessions do): all get a complete
    directory and no temporary directories are left behind."""
    d = str(tmp_path / "m")
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(_build_small, [d, d, d], [3, 3, 3]))
    assert outs == [d, d, d]
    stamp = (Path(d) / "model.safetensors").stat().st_mtime_ns
    assert _build_small(d, 3) == d and (Path(d) / "model.safetensors").stat().st_mtime_ns == stamp
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(d)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["m"]


def test_builds_without_benchmark_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSTAR_DATA_DIR", str(tmp_path / "nowhere"))
    assert benchmark_questions() == []
    from transformers import AutoTokenizer

    d = build_tiny_model(tmp_path / "m", train_steps=0, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok.encode("<end_of_step>", add_special_tokens=False)) == 1


def test_classifier(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    d = build_tiny_classifier(tmp_path / "cls", base_dir=tiny_model_dir)
    m = AutoModelForSequenceClassification.from_pretrained(d)
    assert type(m).__name__ == "Qwen2ForSequenceClassification"
    assert m.config.num_labels == 1 and m.config.pad_token_id is not None
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(m.model.embed_tokens.weight, base["model.embed_tokens.weight"])
    assert m.score.weight.shape == (1, m.config.hidden_size)
    assert float(m.score.weight.detach().std()) > 0.05  # spread head: values are not all ~0
    assert build_tiny_classifier(tmp_path / "cls", base_dir=tiny_model_dir) == d
