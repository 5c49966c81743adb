"""What SFT and PPM training share: arguments, YAML + command-line parsing, precision,
LoRA, resume, logging, and dataset loading / held-out splits.

Arguments are ``transformers.HfArgumentParser`` dataclasses: every ``TrainingArguments`` flag
(``--per_device_train_batch_size``, ``--gradient_checkpointing``, ``--fsdp``, ``--deepspeed``,
``--resume_from_checkpoint``, ...) passes through unchanged, which is what users of HF
training scripts expect (ecosystem.md §4.3). ``--config file.yaml`` supplies defaults for any
of them; flags given on the command line win.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)


@dataclass
class CommonArguments:
    """Arguments shared by ``train-sft`` and ``train-ppm`` (next to ``TrainingArguments``)."""

    model: str = field(default="", metadata={"help": "model directory (or hub id) to start from"})
    data: str = field(default="", metadata={"help": "training rows (JSONL), or search trees (JSONL) to mine first"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out rows/trees (JSONL)"})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "fraction of problems held out for evaluation when no eval_data"}
    )
    split_seed: int = field(default=42, metadata={"help": "seed of the held-out split (by problem id)"})
    max_length: int = field(default=2048, metadata={"help": "maximum tokens per training sequence"})
    max_train_rows: int | None = field(default=None, metadata={"help": "use at most this many rows"})
    dtype: str = field(
        default="auto",
        metadata={"help": "weights dtype: auto (float32 weights, bf16 autocast on GPU), float32, bfloat16, float16"},
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2"})
    add_step_tokens: bool = field(default=True, metadata={"help": "add missing step tokens and resize embeddings"})
    prompt_format: str = field(default="sft", metadata={"help": "prompt format of mined rows: sft or bootstrap"})
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma list or all-linear"})
    auto_resume: bool = field(
        default=True, metadata={"help": "resume from the last checkpoint in output_dir when there is one"}
    )
    tensorboard: bool = field(default=True, metadata={"help": "also log to TensorBoard when it is installed"})


# --------------------------------------------------------------------------- parsing


def parse_arguments(argv: Sequence[str] | None, script_cls: type, prog: str) -> tuple[Any, Any]:
    """``(script_args, training_args)`` from ``--config YAML`` defaults and command-line flags.

    Unknown YAML keys are errors (a typo must not silently do nothing)."""
    import argparse

    from transformers import HfArgumentParser, TrainingArguments

    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser((script_cls, TrainingArguments), prog=prog)
    parser.add_argument("--config", default=None, help="YAML file with defaults for any flag below")
    if known.config:
        data = yaml.safe_load(Path(known.config).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{known.config}: the top level must be a mapping")
        valid = {f.name for f in fields(script_cls)} | {f.name for f in fields(TrainingArguments)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"{known.config}: unknown key(s) {unknown}")
        parser.set_defaults(**data)
    extra = ["--config", known.config] if known.config else []
    script, targs, _ = parser.parse_args_into_dataclasses(args=rest + extra)
    if not script.model or not script.data:
        parser.error("--model and --data are required (on the command line or in --config)")
    if targs.output_dir is None:
        parser.error("--output_dir is required")
    return script, targs


# --------------------------------------------------------------------------- setup helpers


def torch_dtype(name: str) -> Any:
    import torch

    if name in ("auto", "float32", "fp32"):
        return torch.float32
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


def finalize_training_args(script: CommonArguments, targs: Any) -> Any:
    """Precision, logging and resume defaults that depend on the machine.

    * ``dtype=auto`` on a bf16-capable GPU turns on bf16 autocast (weights stay float32).
    * TensorBoard is added to ``report_to`` when installed (console logging is always on).
    * Gradient checkpointing uses the non-reentrant variant (works with LoRA / frozen inputs).
    * ``resume_from_checkpoint``: ``auto`` / unset + ``auto_resume`` -> last checkpoint in
      ``output_dir`` if any; ``last`` / ``true`` -> it must exist."""
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    if script.dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        if not targs.fp16:
            targs.bf16 = True
    if script.tensorboard and _has_tensorboard():
        report = list(targs.report_to or [])
        if "tensorboard" not in report and "all" not in report:
            targs.report_to = [r for r in report if r != "none"] + ["tensorboard"]
    if targs.gradient_checkpointing and targs.gradient_checkpointing_kwargs is None:
        targs.gradient_checkpointing_kwargs = {"use_reentrant": False}
    resume = targs.resume_from_checkpoint
    out = Path(targs.output_dir)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if resume in (None, "", "auto"):
        targs.resume_from_checkpoint = last if (script.auto_resume and last) else None
    elif str(resume).lower() in ("last", "true"):
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no checkpoint in {out}")
        targs.resume_from_checkpoint = last
    if targs.resume_from_checkpoint:
        logger.info("resuming from %s", targs.resume_from_checkpoint)
    return targs


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


def apply_lora(model: Any, script: CommonArguments, task_type: str) -> Any:
    """Wrap ``model`` with LoRA adapters (peft). For ``SEQ_CLS`` peft keeps the ``score`` head
    fully trainable (``modules_to_save``)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is in the train extra
        raise ImportError("use_lora needs peft: pip install 'rstar[lora]'") from exc
    targets: Any = script.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    cfg = LoraConfig(
        r=script.lora_r,
        lora_alpha=script.lora_alpha,
        lora_dropout=script.lora_dropout,
        target_modules=targets,
        task_type=task_type,
    )
    model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100.0 * trainable / total)
    return model


def make_log_callback() -> Any:
    """A callback that sends Trainer metrics to ``logging`` (console), one line per log event."""
    from transformers import TrainerCallback

    class _LogCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and state.is_world_process_zero:
                shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in logs.items()}
                logger.info("step %d/%d: %s", state.global_step, state.max_steps, shown)

    return _LogCallback()


# --------------------------------------------------------------------------- data


def load_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    from rstar.train.mining import read_jsonl

    return read_jsonl(path)


def split_by_problem(
    rows: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out ``fraction`` of the problems (all rows of a problem on one side), so held-out
    pairs never share a prompt with training pairs."""
    if fraction <= 0:
        return rows, []
    ids = sorted({str(r.get("id", i)) for i, r in enumerate(rows)})
    rng = random.Random(seed)
    rng.shuffle(ids)
    n_eval = max(1, int(round(fraction * len(ids)))) if len(ids) > 1 else 0
    held = set(ids[:n_eval])
    train = [r for i, r in enumerate(rows) if str(r.get("id", i)) not in held]
    evals = [r for i, r in enumerate(rows) if str(r.get("id", i)) in held]
    return train, evals


def write_summary(output_dir: str | os.PathLike[str], name: str, data: dict[str, Any]) -> Path:
    p = Path(output_dir) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1, default=str))
    return p


@dataclass
class TrainResult:
    """Where the trained model went and what training measured."""

    output_dir: Path
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    train_rows: int
    eval_rows: int


def load_or_mine_rows(
    script: CommonArguments, path: str, kind: str, tokenizer: Any, **mining: Any
) -> list[dict[str, Any]]:
    """Rows from a rows file, or mined (``kind`` "sft" or "pairs") from a search-trees file."""
    from rstar.search.prompts import PromptConfig
    from rstar.train.mining import (
        PairMiningConfig,
        SFTMiningConfig,
        is_tree_file,
        mine_pairs,
        mine_sft,
        read_trees,
    )

    if not is_tree_file(path):
        return load_rows(path)
    prompt = PromptConfig(format=script.prompt_format)  # type: ignore[arg-type]
    if kind == "sft":
        return mine_sft(read_trees(path), SFTMiningConfig(prompt=prompt, **mining), tokenizer=tokenizer)
    return mine_pairs(read_trees(path), PairMiningConfig(prompt=prompt, **mining), tokenizer=tokenizer)


def encode_datasets(
    script: CommonArguments,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    encode: Any,
    what: str,
) -> tuple[Any, Any]:
    """Encoded ``datasets.Dataset`` objects (None when empty); rows ``encode`` rejects (too
    long) are dropped and counted."""
    import datasets

    def enc(rows: list[dict[str, Any]]) -> Any:
        out, dropped = [], 0
        for r in rows:
            e = encode(r)
            if e is None:
                dropped += 1
            else:
                out.append(e)
        if dropped:
            logger.warning("%s: dropped %d of %d rows longer than max_length=%d", what, dropped, len(rows),
                           script.max_length)
        return datasets.Dataset.from_list(out) if out else None

    return enc(train_rows), enc(eval_rows) if eval_rows else None
