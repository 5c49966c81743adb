"""The nano policy: a digit-splitting tokenizer, a few-million-parameter Qwen2 model, a seed
fine-tune that leaves it deliberately weak, and a greedy evaluation on the nano world.

Why: the self-evolution claim must be shown on 2 CPU cores. A feasibility run showed that a ~1M
parameter decoder learns templated arithmetic in minutes *if* every digit is its own token; this
module builds that model as an ordinary Hugging Face directory (AutoModelForCausalLM /
AutoTokenizer / vLLM load it), so the real pipeline (backends, search, PPM, training) runs on it
unchanged. The seed fine-tune stands in for the paper's bootstrap model.

Measurements: ``python -m rstar.evolve.nano measure --help`` (results in docs/nano-world.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rstar.data import Problem
from rstar.evolve.world import (
    END_OF_ANSWER,
    END_OF_CODE,
    World,
    WorldConfig,
    difficulty_of,
    format_observation,
    reference_solution,
    reference_steps,
    run_world_code,
    solution_code,
)
from rstar.search.prompts import PromptConfig, build_prompt, training_row
from rstar.search.steps import SPECIAL_TOKENS as STEP_TOKENS  # the step and chat markers
from rstar.testing.models import EOS_TOKEN, PAD_TOKEN  # eos/pad shared by all local models

log = logging.getLogger(__name__)

_SFT = PromptConfig(format="sft")


def sft_prompt(question: str) -> str:
    """The SFT-format prompt from the project's one prompt builder (training == inference)."""
    return build_prompt(question, "", _SFT)


# --------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------
@dataclass
class NanoModelConfig:
    """Shape of the nano policy. head_dim = hidden/heads must be >= 32 for vLLM's CPU attention."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    vocab_size: int = 1024  # BPE target (the world saturates near 800); model vocab rounds up to x64
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    seed: int = 0
    tokenizer_problems: int = 3000  # world problems (train split) the tokenizer is trained on


def tokenizer_corpus(world: World, n: int) -> list[str]:
    """Prompt + reference solution texts from the training split (what the policy will read and
    write), so BPE merges whole words while digits stay single."""
    return [sft_prompt(p.question) + reference_solution(p) for p in world.problems("train", n, stream="tokenizer")]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer: no unknown tokens (any text encodes), every digit a single
    token, the rStar step and chat markers single special tokens. The same builder as the
    test models (``rstar.testing``), so HF, vLLM and the raw tokenizer file agree."""
    from rstar.testing.models import train_tokenizer

    return train_tokenizer(texts, vocab_size)


def _qwen2_config(cfg: NanoModelConfig, tokenizer: Any) -> Any:
    from transformers import Qwen2Config

    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def build_base_model(
    out_dir: str | Path,
    *,
    model_config: NanoModelConfig | None = None,
    world_config: WorldConfig | None = None,
) -> Path:
    """Randomly initialised nano policy + trained tokenizer, saved with save_pretrained.

    This is the "base model" of the nano world (the paper's Qwen2.5-Math-7B): every round's
    policy is fine-tuned from it."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    cfg = model_config or NanoModelConfig()
    world = World(world_config)
    out = Path(out_dir)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(tokenizer_corpus(world, cfg.tokenizer_problems), cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(_qwen2_config(cfg, tokenizer)).float()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {"nano_model": asdict(cfg), "world": asdict(world.config), "parameters": count_parameters(model)}
    (out / "rstar_nano.json").write_text(json.dumps(meta, indent=1))
    log.info("nano base model (%d parameters, vocab %d) built in %.1fs at %s",
             meta["parameters"], len(tokenizer), time.perf_counter() - t0, out)  # fmt: skip
    return out


def count_parameters(model: Any) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------------------------
# Seed set and fine-tuning
# --------------------------------------------------------------------------------------------
def seed_rows(
    world: World, n: int, *, difficulties: Sequence[int] = (1, 2), split: str = "seed"
) -> list[tuple[str, str]]:
    """(prompt, response) rows from reference solutions: the seed policy's only training data.

    Easier problems than evaluation (default difficulties 1-2) so that the seed policy starts weak
    on long problems and self-evolution has room to improve."""
    rows = [training_row(p.question, reference_steps(p), _SFT) for p in world.problems(split, n, difficulties=difficulties)]
    return [(r["prompt"], r["response"]) for r in rows]


@dataclass
class FinetuneConfig:
    """Plain-torch SFT on CPU (loss on the response only, as rstar train-sft does)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_len: int = 1024
    seed: int = 0
    threads: int = 2
    log_every: int = 50


@dataclass
class FinetuneResult:
    losses: list[float]
    seconds: float
    steps: int
    tokens: int  # non-pad tokens processed

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps)

    def mean_loss(self, first: int | None = None, last: int | None = None) -> float:
        xs = self.losses[:first] if first else self.losses[-last:] if last else self.losses
        return sum(xs) / max(1, len(xs))


def _encode_rows(tokenizer: Any, rows: Sequence[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """Token ids of prompt + response + eos, and where the response starts."""
    out = []
    for prompt, response in rows:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + r)[-max_len:]
        out.append((ids, max(0, len(ids) - len(r))))
    return out


class SFTRun:
    """A fine-tune that can advance in segments (same optimizer, schedule and data order), so a
    measurement can evaluate checkpoints of one run. ``finetune`` runs it to the end."""

    def __init__(self, model: Any, tokenizer: Any, rows: Sequence[tuple[str, str]],
                 config: FinetuneConfig | None = None) -> None:  # fmt: skip
        import torch

        if not rows:
            raise ValueError("fine-tuning needs at least one row")
        self.model, self.cfg = model, config or FinetuneConfig()
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.data = _encode_rows(tokenizer, rows, cfg.max_len)
        self.pad = tokenizer.pad_token_id
        self.rng = random.Random(cfg.seed)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.order: list[int] = []
        self.step = 0

    def _lr_factor(self, s: int) -> float:
        cfg = self.cfg
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        frac = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def _batch(self) -> tuple[Any, Any, Any]:
        import torch

        bs = self.cfg.batch_size
        if len(self.order) < bs:  # shuffled epochs; a set smaller than a batch repeats
            more = list(range(len(self.data)))
            self.rng.shuffle(more)
            self.order.extend(more * max(1, math.ceil(bs / len(self.data))))
        batch = [self.data[i] for i in self.order[:bs]]
        del self.order[:bs]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (ids, start) in enumerate(batch):
            t = torch.tensor(ids)
            input_ids[j, : len(ids)] = t
            mask[j, : len(ids)] = 1
            labels[j, start : len(ids)] = t[start:]
        return input_ids, mask, labels

    def run(self, n_steps: int | None = None) -> FinetuneResult:
        """Advance n_steps (default: to the end of the schedule)."""
        import torch

        cfg = self.cfg
        n = cfg.steps - self.step if n_steps is None else min(n_steps, cfg.steps - self.step)
        torch.set_num_threads(cfg.threads)
        losses: list[float] = []
        tokens = 0
        self.model.train()
        t0 = time.perf_counter()
        for _ in range(n):
            input_ids, mask, labels = self._batch()
            tokens += int(mask.sum())
            loss = self.model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            self.step += 1
            if cfg.log_every and self.step % cfg.log_every == 0:
                log.info("step %d/%d loss %.4f (%.3fs/step)", self.step, cfg.steps,
                         sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]),
                         (time.perf_counter() - t0) / len(losses))  # fmt: skip
        self.model.eval()
        return FinetuneResult(losses=losses, seconds=time.perf_counter() - t0, steps=n, tokens=tokens)


def finetune(model: Any, tokenizer: Any, rows: Sequence[tuple[str, str]], config: FinetuneConfig | None = None) -> FinetuneResult:
    """Fine-tune ``model`` in place on (prompt, response) rows; AdamW, warmup + cosine decay,
    loss on the response tokens (and the closing eos) only."""
    return SFTRun(model, tokenizer, rows, config).run()


def load_policy(model_dir: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a directory, float32, eval mode, left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def build_seed_policy(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed_size: int = 64,
    difficulties: Sequence[int] = (1, 2),
    finetune_config: FinetuneConfig | None = None,
    world_config: WorldConfig | None = None,
) -> tuple[Path, FinetuneResult]:
    """Base model fine-tuned on ``seed_size`` reference solutions: the nano bootstrap policy."""
    model, tokenizer = load_policy(base_dir)
    rows = seed_rows(World(world_config), seed_size, difficulties=difficulties)
    result = finetune(model, tokenizer, rows, finetune_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"seed_size": seed_size, "difficulties": list(difficulties), "finetune": asdict(finetune_config or FinetuneConfig()),
            "final_loss": result.mean_loss(last=20), "seconds": result.seconds}  # fmt: skip
    (out / "rstar_seed_policy.json").write_text(json.dumps(info, indent=1))
    return out, result


# --------------------------------------------------------------------------------------------
# Greedy evaluation (the rStar greedy protocol: code block, executed output, answer step)
# --------------------------------------------------------------------------------------------
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_answer(text: str) -> str | None:
    """The last ``\\boxed{...}`` content (the world's answers never nest braces)."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def answers_match(pred: str | None, gold: str) -> bool:
    """Numeric equality for the world's integer answers ("12", "12.0" and " 12 " match 12)."""
    if pred is None:
        return False
    try:
        return float(pred.replace(",", "")) == float(gold)
    except ValueError:
        return pred.strip() == gold.strip()


@dataclass
class EvalResult:
    n: int
    correct: int
    code_correct: int  # the executed code printed the right number (before the answer step)
    by_difficulty: dict[int, tuple[int, int]] = field(default_factory=dict)  # d -> (correct, n)
    seconds: float = 0.0
    generated_tokens: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.n)

    @property
    def code_accuracy(self) -> float:
        return self.code_correct / max(1, self.n)

    def summary(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": round(self.accuracy, 4), "code_accuracy": round(self.code_accuracy, 4),
                "by_difficulty": {d: round(c / max(1, k), 3) for d, (c, k) in sorted(self.by_difficulty.items())},
                "seconds": round(self.seconds, 2), "generated_tokens": self.generated_tokens}  # fmt: skip


def _generate(model: Any, tokenizer: Any, prompts: list[str], stop_ids: list[int], max_new_tokens: int,
              do_sample: bool = False, temperature: float = 1.0) -> tuple[list[str], int]:  # fmt: skip
    """Batched HF generate with the KV cache; returns texts (up to and including the stop token)."""
    import torch

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
    gen = out[:, enc["input_ids"].shape[1] :]
    texts, n_tok = [], 0
    stop = set(stop_ids)
    for row in gen.tolist():
        ids = []
        for t in row:
            if t == tokenizer.pad_token_id and t not in stop:
                break
            ids.append(t)
            if t in stop:
                break
        n_tok += len(ids)
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts, n_tok


def greedy_eval(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    batch_size: int = 64,
    max_code_tokens: int = 288,
    max_answer_tokens: int = 48,
    keep_samples: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> EvalResult:
    """Greedy pass@1 as rStar's greedy preset does it: generate the code block (stop at
    ``<end_of_code>``), execute it, append the output, generate the answer step, compare the boxed
    answer with the exact answer. Execution uses the world's safe interpreter (no exec)."""
    code_id, ans_id = tokenizer.convert_tokens_to_ids([END_OF_CODE, END_OF_ANSWER])
    eos = tokenizer.eos_token_id
    res = EvalResult(n=0, correct=0, code_correct=0)
    t0 = time.perf_counter()
    # Longest prompts first keeps padding low inside each batch.
    items = sorted(problems, key=lambda p: -len(p.question))
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        prompts = [sft_prompt(p.question) for p in chunk]
        codes, n1 = _generate(model, tokenizer, prompts, [code_id, ans_id, eos], max_code_tokens, do_sample, temperature)
        outputs = []
        for text in codes:
            program = solution_code(text) if text.endswith(END_OF_CODE) else None
            outputs.append(run_world_code(program) if program is not None else None)
        # Failed code still gets its observation slot (the sandbox would report an error).
        observations = [format_observation(o if o is not None else "Error") for o in outputs]
        second = [p + c + obs for p, c, obs in zip(prompts, codes, observations)]
        answers, n2 = _generate(model, tokenizer, second, [ans_id, eos], max_answer_tokens, do_sample, temperature)
        res.generated_tokens += n1 + n2
        for p, c, o, obs, a in zip(chunk, codes, outputs, observations, answers):
            ok = answers_match(boxed_answer(a), p.answer)
            code_ok = answers_match(o, p.answer)
            d = difficulty_of(p)
            c0, n0 = res.by_difficulty.get(d, (0, 0))
            res.by_difficulty[d] = (c0 + int(ok), n0 + 1)
            res.n += 1
            res.correct += int(ok)
            res.code_correct += int(code_ok)
            if len(res.samples) < keep_samples:
                res.samples.append({"id": p.id, "answer": p.answer, "solution": c + obs + a, "output": o, "correct": ok})
    res.seconds = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------------
# Measurement driver (python -m rstar.evolve.nano measure ...)
# --------------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def measure(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Seconds per step and greedy accuracy on the eval split for a grid of seed sizes x steps.

    For each seed size one fine-tune runs from the base model and is evaluated at each step count
    in ``--steps`` (checkpoints of one run, so the grid costs max(steps) per seed size)."""
    import torch

    ap = argparse.ArgumentParser(prog="python -m rstar.evolve.nano measure")
    ap.add_argument("--out", default="runs/nano-measure")
    ap.add_argument("--seed-sizes", default="32,128,512")
    ap.add_argument("--seed-difficulties", default="1,2")
    ap.add_argument("--seed-split", default="seed", help="split the seed rows come from (train has 7x the pool)")
    ap.add_argument("--steps", default="100,200,400")
    ap.add_argument("--eval-n", type=int, default=120)
    ap.add_argument("--eval-difficulties", default="1,2,3,4,5,6")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample-k", type=int, default=0, help="also pass@k by sampling (T=1) on the eval set")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    mcfg = NanoModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                           num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab)  # fmt: skip
    base = build_base_model(out / "base", model_config=mcfg)
    world = World()
    eval_set = world.problems("eval", args.eval_n, difficulties=_ints(args.eval_difficulties))
    steps_grid = sorted(_ints(args.steps))
    report: dict[str, Any] = {"args": vars(args), "runs": []}
    for size in _ints(args.seed_sizes):
        model, tok = load_policy(base)
        if size == _ints(args.seed_sizes)[0]:
            report["parameters"] = count_parameters(model)
            report["vocab"] = len(tok)
            rows = seed_rows(world, 4, difficulties=_ints(args.seed_difficulties))
            report["tokens_per_seed_row"] = sum(len(tok(p + r)["input_ids"]) for p, r in rows) / len(rows)
        rows = seed_rows(world, size, difficulties=_ints(args.seed_difficulties), split=args.seed_split)
        sft = SFTRun(model, tok, rows, FinetuneConfig(steps=steps_grid[-1], batch_size=args.batch_size,
                                                      lr=args.lr, threads=args.threads, log_every=0))  # fmt: skip
        for s in steps_grid:
            seg = sft.run(s - sft.step)
            ev = greedy_eval(model, tok, eval_set, keep_samples=3)
            run = {"seed_size": size, "steps": s, "seconds_per_step": round(seg.seconds_per_step, 4),
                   "tokens_per_step": round(seg.tokens / max(1, seg.steps), 1),
                   "train_loss": round(seg.mean_loss(last=20), 4), "eval": ev.summary()}  # fmt: skip
            if args.sample_k:
                hits = [False] * len(eval_set)
                for _ in range(args.sample_k):
                    ev_s = greedy_eval(model, tok, eval_set, do_sample=True, keep_samples=len(eval_set))
                    by_id = {x["id"]: x["correct"] for x in ev_s.samples}
                    hits = [h or by_id[p.id] for h, p in zip(hits, eval_set)]
                run[f"pass@{args.sample_k}_T1"] = round(sum(hits) / len(hits), 4)
            log.info("measure %s", json.dumps(run))
            run["samples"] = ev.samples
            report["runs"].append(run)
            # Written after every checkpoint: a long measurement stopped early keeps what it has.
            (out / "measure.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(prog="python -m rstar.evolve.nano", description="nano-world model tools")
    ap.add_argument("command", choices=["measure", "build-base"])
    args, rest = ap.parse_known_args(argv)
    if args.command == "measure":
        report = measure(rest)
        print(json.dumps([{k: v for k, v in r.items() if k != "samples"} for r in report["runs"]], indent=1))
    else:
        p = argparse.ArgumentParser(prog="python -m rstar.evolve.nano build-base")
        p.add_argument("out")
        a = p.parse_args(rest)
        build_base_model(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
