"""SFT and PPM training on CPU with the tiny local model (transformers Trainer end to end)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

from rstar.search.prompts import build_prompt, encode_continuation, encode_prompt  # noqa: E402
from rstar.train.data import IGNORE_INDEX, PairCollator, encode_pair_row, encode_sft_row  # noqa: E402
from rstar.train.mining import write_jsonl  # noqa: E402

GOOD = ["verify", "exact", "total", "check", "carefully", "sum", "correct", "product"]
BAD = ["guess", "maybe", "random", "skip", "roughly", "wrong", "ignore", "whatever"]


def _targs(out: Path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), use_cpu=True, report_to=[], logging_steps=5, save_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0, seed=0, learning_rate=2e-3,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def _question(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"Ann has {a} apples and buys {b} more. How many apples does Ann have now?"


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Pairs a tiny model can learn in seconds: the chosen step's comment uses words from one
    vocabulary, the rejected step's from another; prompts, numbers and word choices are random,
    so held-out pairs (other seed) test generalisation, not memorisation."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = _question(rng)
        prefix = [f"<code>\n# Step 1: start\nstart = {rng.randint(2, 99)}\n<end_of_step>"] if rng.random() < 0.5 else []
        head = build_prompt(q)

        def step(words: list[str]) -> str:
            w = " ".join(rng.sample(words, 3))
            return f"\n# {w}\nx = {rng.randint(2, 99)} + {rng.randint(2, 99)}\n<end_of_step>"

        rows.append({
            "id": f"{seed}-{i}", "prompt": head + "".join(prefix), "prompt_head": head, "prefix": prefix,
            "chosen": step(GOOD), "rejected": step(BAD), "pos_count": 2, "neg_count": 2,
        })
    return rows


def sft_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        q = f"Ann has {a} apples and buys {b} more. How many apples does Ann have now?"
        steps = [f"<code>\n# Step 1: add the apples\ntotal = {a} + {b}\n<end_of_step>",
                 "\n# Now print the final answer\nprint(total)\n<end_of_code>",
                 f"\n<output>{a + b}<end_of_output>",
                 f"\n<answer>Ann has \\boxed{{{a + b}}} apples.\n<end_of_answer>"]
        rows.append({"id": str(i), "prompt": build_prompt(q), "response": "".join(steps), "steps": steps})
    return rows


def _sft_loss(model_dir: Path, rows: list[dict]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rstar.train.data import SFTCollator

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = SFTCollator(tok.pad_token_id)([encode_sft_row(tok, r, 1024) for r in rows])
    with torch.no_grad():
        return float(model(**batch).loss)


def test_sft_row_encoding_masks_the_prompt(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = sft_rows(1, 0)[0]
    e = encode_sft_row(tok, row, 1024)
    p = encode_prompt(tok, row["prompt"])
    resp = [i for s in row["steps"] for i in encode_continuation(tok, s)] + [tok.eos_token_id]
    assert e["input_ids"] == p + resp
    assert e["labels"] == [IGNORE_INDEX] * len(p) + resp
    assert tok.decode(e["input_ids"][:-1]) == row["prompt"] + row["response"]
    assert encode_sft_row(tok, row, len(p) + 3) is None  # too long: dropped, never cut


def test_pair_encoding_and_collator(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = next(r for r in synthetic_pairs(10, 0) if r["prefix"])
    e = encode_pair_row(tok, row, 1024)
    p = encode_prompt(tok, row["prompt_head"]) + encode_continuation(tok, row["prefix"][0])
    assert e["chosen_input_ids"] == p + encode_continuation(tok, row["chosen"])
    assert e["weight"] == 0.25 and not e["truncated"]
    cut = encode_pair_row(tok, row, 10)  # left truncation keeps the scored step's end
    assert cut["truncated"] and cut["chosen_input_ids"] == e["chosen_input_ids"][-10:]
    e2 = encode_pair_row(tok, synthetic_pairs(3, 1)[0], 1024)
    batch = PairCollator(tok.pad_token_id)([e, e2])
    assert batch["input_ids"].shape[0] == 4 and batch["weight"].tolist() == [0.25, 0.25]
    assert batch["attention_mask"][0].sum() == len(e["chosen_input_ids"])
    assert batch["attention_mask"][2].sum() == len(e["rejected_input_ids"])


def test_sft_lowers_the_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rstar.train.sft import SFTArguments, train_sft

    rows = sft_rows(24, 0)
    data = write_jsonl(rows, tmp_path / "sft.jsonl")
    before = _sft_loss(tiny_model_dir, rows)
    script = SFTArguments(model=str(tiny_model_dir), data=str(data), max_length=512)
    res = train_sft(script, _targs(tmp_path / "out", per_device_train_batch_size=8, num_train_epochs=4))
    after = _sft_loss(tmp_path / "out", rows)
    logging.getLogger(__name__).info("SFT loss %.3f -> %.3f", before, after)
    assert after < 0.6 * before, (before, after)
    assert res.train_rows == 24 and (tmp_path / "out" / "rstar_train.json").is_file()


def test_ppm_learns_synthetic_preferences(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rstar.ppm import PPM
    from rstar.train.ppm import PPMArguments, train_ppm

    train = write_jsonl(synthetic_pairs(96, 0), tmp_path / "train.jsonl")
    held = synthetic_pairs(48, 1)
    evalf = write_jsonl(held, tmp_path / "eval.jsonl")
    def held_out_accuracy(ppm: PPM) -> float:
        s_c = ppm.score([r["prompt"] + r["chosen"] for r in held])
        s_r = ppm.score([r["prompt"] + r["rejected"] for r in held])
        return sum(c > r for c, r in zip(s_c, s_r)) / len(held)

    before = held_out_accuracy(PPM.from_policy(tiny_model_dir, seed=0))  # the init train_ppm uses
    script = PPMArguments(model=str(tiny_model_dir), data=str(train), eval_data=str(evalf), max_length=256)
    res = train_ppm(script, _targs(tmp_path / "ppm", per_device_train_batch_size=8,
                                   per_device_eval_batch_size=16, num_train_epochs=1))
    acc = res.eval_metrics["eval_pair_accuracy"]
    logging.getLogger(__name__).info("held-out pair accuracy %.3f -> %.3f, metrics %s", before, acc,
                                     res.eval_metrics)
    assert acc >= 0.85 and acc >= before + 0.2, (before, res.eval_metrics)
    # the saved directory is a PPM whose scores give the same ranking as the trainer's eval
    assert held_out_accuracy(PPM.from_pretrained(tmp_path / "ppm")) == pytest.approx(acc, abs=1e-9)
    metrics = json.loads((tmp_path / "ppm" / "eval_results.json").read_text())
    assert metrics["eval_pair_accuracy"] == acc


def test_ppm_trainer_loss_matches_hand_computation(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from rstar.ppm import PPM, pairwise_loss
    from rstar.train.ppm import make_ppm_trainer_class

    ppm = PPM.from_policy(tiny_model_dir, seed=0, head_init_std=1.0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = synthetic_pairs(3, 5)
    rows[1]["pos_count"], rows[1]["neg_count"] = 1, 4
    feats = [encode_pair_row(tok, r, 256) for r in rows]
    batch = PairCollator(tok.pad_token_id)(feats)
    trainer = make_ppm_trainer_class()(model=ppm.model, args=_targs(tmp_path), processing_class=tok)
    loss = trainer.compute_loss(ppm.model, dict(batch)).detach()
    def raw(ids: list[int]) -> float:
        with torch.no_grad():
            return float(ppm(torch.tensor([ids]))[0])

    rc = torch.tensor([raw(f["chosen_input_ids"]) for f in feats])
    rr = torch.tensor([raw(f["rejected_input_ids"]) for f in feats])
    w = torch.tensor([0.25, 0.25, 0.25])
    expected = sum(wi * torch.log1p(torch.exp(-(c - r))) for wi, c, r in zip(w, rc, rr)) / 3
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert float(loss) == pytest.approx(float(pairwise_loss(rc, rr, w)), rel=1e-4)


def test_cli_yaml_config_and_resume(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from rstar.train.cli import main_ppm

    data = write_jsonl(synthetic_pairs(24, 2), tmp_path / "pairs.jsonl")
    cfg = tmp_path / "ppm.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\ndata: {data}\neval_fraction: 0.25\nmax_length: 256\n"
        "per_device_train_batch_size: 4\nlearning_rate: 0.001\nsave_steps: 3\nsave_strategy: steps\n"
        "use_cpu: true\nreport_to: []\ndisable_tqdm: true\nmax_steps: 3\n"
    )
    out = tmp_path / "run"
    assert main_ppm(["--config", str(cfg), "--output_dir", str(out)]) == 0
    assert (out / "checkpoint-3").is_dir()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # a second run with more steps continues from the checkpoint (auto resume), CLI flag wins
    with caplog.at_level(logging.INFO, logger="rstar.train.common"):
        assert main_ppm(["--config", str(cfg), "--output_dir", str(out), "--max_steps", "5"]) == 0
    assert any("resuming from" in r.message and "checkpoint-3" in r.message for r in caplog.records)
    summary = json.loads((out / "rstar_train.json").read_text())
    assert summary["kind"] == "ppm" and summary["eval_pairs"] > 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 5
    with pytest.raises(ValueError, match="unknown key"):
        cfg.write_text("modle: x\n")
        main_ppm(["--config", str(cfg), "--output_dir", str(out)])


def _trees(n: int) -> list[dict]:
    """Search trees: per problem one correct and one wrong terminal answer under the root."""
    rng = random.Random(7)
    trees = []
    for i in range(n):
        q = _question(rng)

        def node(nid: int, q_: float, ok: bool) -> dict:
            words = " ".join(rng.sample(GOOD if ok else BAD, 4))
            return {"id": nid, "parent": 0, "depth": 1, "text": f"<code>\n# {words}\nprint({nid})\n<end_of_code>",
                    "visits": 1, "q": q_, "value": None, "terminal": True, "valid": True,
                    "answer": "1" if ok else "2", "correct": ok, "exec_ok": True}

        root = {"id": 0, "parent": -1, "depth": 0, "text": "", "visits": 2, "q": 0.0, "value": None,
                "terminal": False, "valid": True, "answer": None, "correct": None, "exec_ok": None}
        trees.append({"id": f"t{i}", "question": q, "answer": "1", "nodes": [root, node(1, 1.0, True),
                                                                          node(2, -1.0, False)]})
    return trees


@pytest.mark.slow
def test_lora_and_gradient_checkpointing_from_trees(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Trees as --data are mined on the fly; LoRA adapters are merged into full saved models."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from rstar.ppm import PPM
    from rstar.train.ppm import PPMArguments, train_ppm
    from rstar.train.sft import SFTArguments, train_sft

    trees = write_jsonl(_trees(6), tmp_path / "trees.jsonl")
    targs = dict(per_device_train_batch_size=2, max_steps=2, gradient_checkpointing=True)
    common = dict(model=str(tiny_model_dir), data=str(trees), use_lora=True, lora_r=4, max_length=256)
    res = train_ppm(PPMArguments(eval_fraction=0.34, **common), _targs(tmp_path / "ppm", **targs))
    assert res.train_rows + res.eval_rows == 6 and res.eval_rows == 2  # one pair per tree, split by tree
    assert 0.0 <= res.eval_metrics["eval_pair_accuracy"] <= 1.0
    with safe_open(str(tmp_path / "ppm" / "model.safetensors"), framework="pt") as fh:
        assert not any("lora" in k for k in fh.keys()) and "score.weight" in set(fh.keys())
    assert len(PPM.from_pretrained(tmp_path / "ppm").score(["<|user|>:\nhi"])) == 1
    res = train_sft(SFTArguments(**common), _targs(tmp_path / "sft", **targs))
    assert res.train_rows == 6  # one correct trajectory per tree
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft")  # merged: a plain causal LM again
    with safe_open(str(tmp_path / "sft" / "model.safetensors"), framework="pt") as fh:
        assert not any("lora" in k for k in fh.keys())


@pytest.mark.parametrize("name", ["sft", "ppm", "sft_nano", "ppm_nano"])
def test_shipped_configs_parse(name: str, tmp_path: Path) -> None:
    from rstar.train.common import parse_arguments
    from rstar.train.ppm import PPMArguments
    from rstar.train.sft import SFTArguments

    cls = PPMArguments if name.startswith("ppm") else SFTArguments
    cfg = Path(__file__).resolve().parents[1] / "configs" / "train" / f"{name}.yaml"
    script, targs = parse_arguments(["--config", str(cfg), "--model", "m", "--data", "d.jsonl",
                                     "--output_dir", str(tmp_path), "--learning_rate", "0.5"], cls, "t")
    assert script.model == "m" and targs.learning_rate == 0.5  # the command line wins over the file
    if name == "ppm":
        assert targs.metric_for_best_model == "pair_accuracy" and script.eval_fraction == 0.05


def test_cli_help_lists_training_arguments(capsys: pytest.CaptureFixture) -> None:
    from rstar.train.cli import main_ppm, main_sft

    for main in (main_sft, main_ppm):
        with pytest.raises(SystemExit) as exc:
            main(["--help"])
        assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--gradient_checkpointing" in text and "--value_scale" in text and "--top_n" in text
