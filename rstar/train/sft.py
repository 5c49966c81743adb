"""``rstar train-sft``: fine-tune the policy on SFT rows (loss on the response only).

The paper trains each round's policy from the base model on that round's SFT rows
(rstar-math.md §6.1: 2 epochs, lr 7e-6, weight decay 0.1, global batch 128, bf16, FSDP);
configs/train/sft.yaml holds those values. Rows are ``{prompt, response[, steps]}`` as written
by ``rstar.train.mine_sft``; a search-tree file given as ``--data`` is mined first.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rstar.train.common import (
    CommonArguments,
    TrainResult,
    apply_lora,
    encode_datasets,
    finalize_training_args,
    load_or_mine_rows,
    make_log_callback,
    split_by_problem,
    torch_dtype,
    write_summary,
)

logger = logging.getLogger(__name__)


@dataclass
class SFTArguments(CommonArguments):
    """``train-sft`` arguments (with every ``TrainingArguments`` flag alongside)."""

    top_n: int = field(default=2, metadata={"help": "trajectories per problem when --data holds trees"})
    merge_lora: bool = field(default=True, metadata={"help": "save the LoRA-merged full model at the end"})


def train_sft(script: SFTArguments, targs: Any) -> TrainResult:
    """Fine-tune ``script.model`` on ``script.data``; the final model (merged when LoRA) and its
    tokenizer go to ``targs.output_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed

    from rstar.train.data import SFTCollator, encode_sft_row
    from rstar.train.tokens import ensure_step_tokens

    targs = finalize_training_args(script, targs)
    set_seed(targs.seed)
    tokenizer = AutoTokenizer.from_pretrained(script.model)
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype(script.dtype)}
    if script.attn_implementation:
        load_kwargs["attn_implementation"] = script.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(script.model, **load_kwargs)
    if script.add_step_tokens:
        ensure_step_tokens(tokenizer, model)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; run with --add_step_tokens true")

    rows = load_or_mine_rows(script, script.data, "sft", tokenizer, top_n=script.top_n)
    if script.max_train_rows:
        rows = rows[: script.max_train_rows]
    if script.eval_data:
        train_rows, eval_rows = rows, load_or_mine_rows(script, script.eval_data, "sft", tokenizer, top_n=script.top_n)
    else:
        train_rows, eval_rows = split_by_problem(rows, script.eval_fraction, script.split_seed)
    train_ds, eval_ds = encode_datasets(
        script, train_rows, eval_rows, lambda r: encode_sft_row(tokenizer, r, script.max_length), "SFT"
    )
    if train_ds is None:
        raise ValueError(f"no SFT rows to train on in {script.data}")
    logger.info("SFT: %d training rows, %d held-out rows", len(train_ds), len(eval_ds) if eval_ds else 0)

    if script.use_lora:
        model = apply_lora(model, script, "CAUSAL_LM")
        if targs.gradient_checkpointing:
            model.enable_input_require_grads()
    targs.remove_unused_columns = False
    if eval_ds is None and str(targs.eval_strategy) not in ("no", "IntervalStrategy.NO"):
        logger.warning("no held-out rows: evaluation disabled")
        targs.eval_strategy = "no"
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=SFTCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[make_log_callback()],
    )
    out = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    train_metrics = dict(out.metrics)
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    if script.use_lora and script.merge_lora:
        if trainer.is_world_process_zero():  # a full model that vLLM / the search can load
            trainer.model.merge_and_unload().save_pretrained(targs.output_dir)
            tokenizer.save_pretrained(targs.output_dir)
    else:
        trainer.save_model(targs.output_dir)  # gathers FSDP / DeepSpeed shards; saves the tokenizer
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.save_metrics("train", train_metrics)
        if eval_metrics:
            trainer.save_metrics("eval", eval_metrics)
        write_summary(targs.output_dir, "rstar_train.json", {
            "kind": "sft", "args": asdict(script), "train": train_metrics, "eval": eval_metrics,
            "train_rows": len(train_ds), "eval_rows": len(eval_ds) if eval_ds else 0,
        })
    trainer.accelerator.wait_for_everyone()
    return TrainResult(Path(targs.output_dir), train_metrics, eval_metrics, len(train_ds),
                       len(eval_ds) if eval_ds else 0)
