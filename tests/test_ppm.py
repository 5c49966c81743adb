"""The PPM module: loss, scoring, save/load, export as sequence classification, load errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

from rstar.backends import HFScorer, ScoreRequest, Scorer  # noqa: E402
from rstar.ppm import (  # noqa: E402
    PPM,
    PPMLoadError,
    check_ppm_dir,
    load_scorer,
    pair_accuracy,
    pairwise_loss,
)
from rstar.search.prompts import build_prompt  # noqa: E402

TEXTS = [
    build_prompt("What is 2 + 3?", ["<code>\n# Step 1: add\nx = 2 + 3\n<end_of_step>"]),
    build_prompt("What is 2 + 3?", ["<code>\n# Step 1: multiply\nx = 2 * 3\n<end_of_step>"]),
    build_prompt("A box holds 4 rows of 5 pens. How many pens?", "<code>\nprint(4 * 5)\n<end_of_code>"),
    "short",
]


@pytest.fixture(scope="module")
def ppm(tiny_model_dir: Path) -> PPM:
    return PPM.from_policy(tiny_model_dir, seed=0, head_init_std=0.5)


@pytest.fixture(scope="module")
def saved(ppm: PPM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ppm.save_pretrained(tmp_path_factory.mktemp("ppm") / "ppm")


def _raw(ppm: PPM, texts: list[str]) -> list[float]:
    """Raw values one text at a time through PPM.forward (no padding involved)."""
    out = []
    for t in texts:
        ids = ppm.tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(float(ppm(ids, torch.ones_like(ids))[0]))
    return out


def test_pairwise_loss_hand_computation() -> None:
    rc = torch.tensor([1.0, 0.0, 3.0])
    rr = torch.tensor([0.0, 2.0, -1.0])
    w = torch.tensor([0.25, 1.0, 0.5])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -2, 4
    per = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0)), math.log1p(math.exp(-4.0))]
    weighted = [0.25 * per[0], 1.0 * per[1], 0.5 * per[2]]
    assert float(pairwise_loss(rc, rr, w, "sum")) == pytest.approx(sum(weighted), rel=1e-6)
    assert float(pairwise_loss(rc, rr, w, "mean")) == pytest.approx(sum(weighted) / 3, rel=1e-6)
    assert float(pairwise_loss(rc, rr)) == pytest.approx(sum(per) / 3, rel=1e-6)
    assert pair_accuracy(rc, rr) == pytest.approx(2 / 3)
    # stable at huge margins (no inf / nan)
    big = pairwise_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert float(big) == pytest.approx(2000.0)


def test_ppm_structure_and_scorer_protocol(ppm: PPM) -> None:
    assert isinstance(ppm, Scorer)
    head = ppm.value_head
    assert isinstance(head, torch.nn.Linear) and head.out_features == 1 and head.bias is None
    assert not hasattr(ppm.hf_model, "lm_head")  # the LM head was replaced, not kept
    vals = ppm.score([ScoreRequest(text=t) for t in TEXTS])
    raw = _raw(ppm, TEXTS)
    assert vals == pytest.approx([math.tanh(r) for r in raw], abs=1e-5)
    assert all(-1 < v < 1 for v in vals) and len(set(round(v, 6) for v in vals)) == len(vals)
    # the value is read at the last token: appending a token changes it, batch order does not
    assert ppm.score(TEXTS[::-1]) == pytest.approx(vals[::-1], abs=1e-5)
    assert ppm.score([TEXTS[0] + " more"])[0] != pytest.approx(vals[0], abs=1e-6)
    # ids and text requests agree
    ids = [ppm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert ppm.score([ScoreRequest(prompt_ids=i) for i in ids]) == pytest.approx(vals, abs=1e-6)


def test_value_scale(tiny_model_dir: Path) -> None:
    p1 = PPM.from_policy(tiny_model_dir, seed=3, head_init_std=2.0)
    p5 = PPM(p1.model, p1.tokenizer, value_scale=5.0)
    raw = _raw(p1, TEXTS)
    assert p5.score(TEXTS) == pytest.approx([math.tanh(r / 5) for r in raw], abs=1e-5)


def test_save_load_identical_scores(ppm: PPM, saved: Path) -> None:
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["rstar_ppm"]["value_scale"] == 1.0 and cfg["pad_token_id"] == ppm.tokenizer.pad_token_id
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"]
    loaded = PPM.from_pretrained(saved)
    assert loaded.score(TEXTS) == ppm.score(TEXTS)  # bit-identical
    sd0, sd1 = ppm.hf_model.state_dict(), loaded.hf_model.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_loading_without_head_is_a_clear_error(tiny_model_dir: Path, saved: Path, tmp_path: Path) -> None:
    with pytest.raises(PPMLoadError, match="no value head.*causal-LM checkpoint"):
        PPM.from_pretrained(tiny_model_dir)
    # the official layout: backbone saved as a causal LM + a separate value_head.bin
    official = tmp_path / "official"
    shutil.copytree(tiny_model_dir, official)
    torch.save({"summary.weight": torch.zeros(1, 64)}, official / "value_head.bin")
    with pytest.raises(PPMLoadError, match="value_head.bin"):
        PPM.from_pretrained(official)
    with pytest.raises(PPMLoadError, match="does not exist"):
        PPM.from_pretrained(tmp_path / "nowhere")
    assert check_ppm_dir(saved)["architectures"] == ["Qwen2ForSequenceClassification"]


def test_export_loads_in_transformers_with_same_scores(ppm: PPM, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = ppm.export_sequence_classification(tmp_path / "export")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id is not None
    # padded batch through the plain transformers forward (its own last-non-pad pooling)
    tok.padding_side = "right"
    enc = tok(TEXTS, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[:, 0].tolist()
    assert [math.tanh(x) for x in logits] == pytest.approx(ppm.score(TEXTS), abs=1e-5)
    # and through the backends' generic scorer
    assert HFScorer(str(out), dtype="float32", device="cpu").score(
        [ScoreRequest(text=t) for t in TEXTS]) == pytest.approx(ppm.score(TEXTS), abs=1e-5)
    # load_scorer reads the value scale from the directory
    p2 = PPM(ppm.model, ppm.tokenizer, value_scale=2.0)
    scaled = p2.export_sequence_classification(tmp_path / "scaled")
    assert load_scorer(scaled, device="cpu", dtype="float32").score(
        [ScoreRequest(text=t) for t in TEXTS]) == pytest.approx(p2.score(TEXTS), abs=1e-5)
    with pytest.raises(PPMLoadError):
        load_scorer(tmp_path / "nowhere")
    # a bf16 export for serving
    bf = PPM.from_pretrained(ppm.export_sequence_classification(tmp_path / "bf16", dtype="bfloat16"))
    assert bf.hf_model.dtype == torch.bfloat16
    assert ppm.hf_model.dtype == torch.float32  # the exported copy was cast, not the PPM itself


def test_step_tokens_added_and_embeddings_resized(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from rstar.search.steps import SPECIAL_TOKENS
    from rstar.train.tokens import ensure_step_tokens, missing_step_tokens

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["x = 1 + 2\nprint(x)"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    assert set(missing_step_tokens(tok)) == set(SPECIAL_TOKENS)
    added = ensure_step_tokens(tok, model)
    assert set(added) == set(SPECIAL_TOKENS) | {"<|pad|>"}
    assert missing_step_tokens(tok) == []
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert ensure_step_tokens(tok, model) == []  # idempotent
