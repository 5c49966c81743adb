"""The nano policy: digit-splitting tokenizer, Qwen2 model directory, seed fine-tune, greedy eval."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rstar.evolve.nano import (  # noqa: E402
    FinetuneConfig,
    NanoModelConfig,
    SFTRun,
    answers_match,
    boxed_answer,
    build_base_model,
    count_parameters,
    finetune,
    greedy_eval,
    load_policy,
    seed_rows,
    sft_prompt,
)
from rstar.evolve.world import World, WorldConfig, reference_solution  # noqa: E402
from rstar.search.steps import SPECIAL_TOKENS  # noqa: E402

# A small shape keeps the tests fast; head_dim stays 32 (vLLM's CPU attention minimum).
SMALL = NanoModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                        tokenizer_problems=300)  # fmt: skip


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return build_base_model(tmp_path_factory.mktemp("nano") / "base", model_config=SMALL)


@pytest.fixture(scope="module")
def tokenizer(base_dir: Path):  # type: ignore[no-untyped-def]
    """The saved tokenizer, reloaded through AutoTokenizer (what the backends will use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def test_tokenizer_round_trip(world: World, tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = [sft_prompt(p.question) + reference_solution(p) for p in world.problems("eval", 50)]
    texts += ["Unseen wörds, émojis 🙂 and 1234567890!", "x = 3 ** 2\n\n\tprint(x)"]
    for t in texts:
        assert tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"]) == t


def test_every_digit_is_its_own_token(world: World, tokenizer) -> None:  # type: ignore[no-untyped-def]
    for p in world.problems("eval", 30):
        ids = tokenizer(sft_prompt(p.question) + reference_solution(p), add_special_tokens=False)["input_ids"]
        for piece in (tokenizer.decode([i]) for i in ids):
            if re.search(r"\d", piece):
                assert re.fullmatch(r"\d", piece), piece
    assert len(tokenizer("907", add_special_tokens=False)["input_ids"]) == 3


def test_step_markers_are_single_special_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    for s in SPECIAL_TOKENS:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == s
    # No hidden BOS/EOS insertion: prompts concatenate exactly.
    assert tokenizer("a", add_special_tokens=True)["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]


def test_base_model_loads_with_auto_classes(base_dir: Path, world: World) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    assert model.config.model_type == "qwen2"
    assert len(tok) <= model.config.vocab_size
    assert tok.pad_token_id != tok.eos_token_id
    n = count_parameters(model)
    assert 50_000 < n < 5_000_000
    text = sft_prompt(world.problems("eval", 1)[0].question)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert (Path(base_dir) / "rstar_nano.json").is_file()


def test_default_shape_is_a_few_million_parameters_or_less() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = NanoModelConfig()
    assert cfg.hidden_size % cfg.num_heads == 0 and cfg.hidden_size // cfg.num_heads >= 32
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=832, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                         num_key_value_heads=cfg.num_kv_heads, tie_word_embeddings=True))  # fmt: skip
    assert 500_000 < count_parameters(model) < 5_000_000


def test_seed_rows_are_prompt_and_reference_solution(world: World) -> None:
    rows = seed_rows(world, 8, difficulties=(1, 2))
    probs = world.problems("seed", 8, difficulties=(1, 2))
    assert rows == [(sft_prompt(p.question), reference_solution(p)) for p in probs]
    assert rows[0][0].startswith("<|user|>:\n") and rows[0][1].startswith("<code>")


def test_short_finetune_lowers_the_loss(base_dir: Path, world: World) -> None:
    model, tok = load_policy(base_dir)
    rows = seed_rows(world, 16, difficulties=(1,))
    res = finetune(model, tok, rows, FinetuneConfig(steps=30, batch_size=4, lr=3e-3, warmup_steps=5, threads=1, log_every=0))
    assert len(res.losses) == 30 and res.tokens > 0
    assert res.mean_loss(last=5) < 0.7 * res.mean_loss(first=5)


def test_sft_run_segments_equal_one_run(base_dir: Path, world: World) -> None:
    rows = seed_rows(world, 8, difficulties=(1,))
    cfg = FinetuneConfig(steps=6, batch_size=4, threads=1, log_every=0)
    m1, tok = load_policy(base_dir)
    whole = SFTRun(m1, tok, rows, cfg).run()
    m2, _ = load_policy(base_dir)
    run = SFTRun(m2, tok, rows, cfg)
    parts = run.run(2).losses + run.run(10).losses  # the second call stops at the schedule's end
    assert run.step == 6
    assert parts == pytest.approx(whole.losses, rel=1e-5)


def test_loss_is_on_the_response_only(base_dir: Path) -> None:
    from rstar.evolve.nano import _encode_rows

    _, tok = load_policy(base_dir)
    (ids, start), = _encode_rows(tok, [("<|user|>:\nQ\n\n<|assistant|>: go.", "<code>\nx = 1\n<end_of_step>")], 1024)
    assert tok.decode(ids[start:]) == "<code>\nx = 1\n<end_of_step><|endoftext|>"


def test_grading_helpers() -> None:
    assert boxed_answer("so \\boxed{12} and then \\boxed{ 14 }") == "14"
    assert boxed_answer("no box") is None
    assert answers_match("12.0", "12") and answers_match("1,200", "1200")
    assert not answers_match("13", "12") and not answers_match(None, "12")


def test_greedy_eval_runs_the_protocol(base_dir: Path, world: World) -> None:
    model, tok = load_policy(base_dir)
    probs = world.problems("eval", 4, difficulties=(1, 2))
    res = greedy_eval(model, tok, probs, batch_size=4, max_code_tokens=24, max_answer_tokens=8, keep_samples=4)
    assert res.n == 4 and sum(n for _, n in res.by_difficulty.values()) == 4
    assert set(res.by_difficulty) == {1, 2}
    assert 0 < res.generated_tokens <= 4 * (24 + 8)
    assert all("<output>" in s["solution"] for s in res.samples)  # the executed output was appended
