"""``rstar train-ppm``: train the process preference model on preference pairs.

Model: the PPM initialised from the round's policy (``rstar.ppm.PPM.from_policy``: backbone =
policy, value head random), or an existing PPM directory to continue training. Loss: the
pairwise ranking loss ``-log σ(r_c - r_r)`` weighted by 1/(pos·neg) (``rstar.ppm.pairwise_loss``).
Evaluation reports pair accuracy (``r_c > r_r``) on held-out problems. Official settings
(rstar-math.md §6.2): 2 epochs, lr 7e-6, 512 pairs per step, 5% held out, bf16, gradient
checkpointing, FSDP — configs/train/ppm.yaml.
"""

from __future__ import annotations

import functools
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
    write_summary,
)

logger = logging.getLogger(__name__)


@dataclass
class PPMArguments(CommonArguments):
    """``train-ppm`` arguments (with every ``TrainingArguments`` flag alongside)."""

    eval_fraction: float = field(default=0.05, metadata={"help": "fraction of problems held out (official: 0.05)"})
    value_scale: float = field(default=1.0, metadata={"help": "inference value = tanh(r / value_scale)"})
    loss_reduction: str = field(default="mean", metadata={"help": "mean (weighted mean over pairs) or sum (official)"})
    head_init_std: float | None = field(default=None, metadata={"help": "value head init std (default initializer_range)"})
    min_margin: float = field(default=0.5, metadata={"help": "pair mining (trees as --data): minimum Q margin"})
    min_edit_distance: int = field(default=20, metadata={"help": "pair mining: minimum edit distance of the steps"})
    top_k: int = field(default=2, metadata={"help": "pair mining: candidates per side"})
    top_k_single: int = field(default=4, metadata={"help": "pair mining: candidates when the other side has one"})


def _pair_metrics(eval_pred: Any) -> dict[str, float]:
    """Pair accuracy (and its 1/(pos·neg)-weighted version) from (r_c, r_r) predictions."""
    import numpy as np

    preds = eval_pred.predictions
    weights = np.asarray(eval_pred.label_ids, dtype=np.float64).reshape(-1)
    preds = np.asarray(preds, dtype=np.float64).reshape(-1, 2)
    correct = (preds[:, 0] > preds[:, 1]).astype(np.float64)
    return {
        "pair_accuracy": float(correct.mean()) if len(correct) else 0.0,
        "weighted_pair_accuracy": float((correct * weights).sum() / max(weights.sum(), 1e-12)),
        "mean_margin": float((preds[:, 0] - preds[:, 1]).mean()) if len(correct) else 0.0,
    }


@functools.cache
def make_ppm_trainer_class() -> type:
    """The ``Trainer`` subclass (built lazily so importing rstar.train needs no transformers)."""
    import torch
    from transformers import Trainer

    from rstar.ppm.loss import pairwise_loss

    class PPMTrainer(Trainer):
        """Pairwise ranking loss on the one-label model. Chosen and rejected sequences go through
        the model in one forward call (the wrapped model, so DDP / FSDP / DeepSpeed hooks run)."""

        # our loss is a per-batch mean; the Trainer divides it by the accumulation steps
        loss_is_scaled_for_ga = False

        def __init__(self, *args: Any, loss_reduction: str = "mean", **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.loss_reduction = loss_reduction

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            weight = inputs["weight"]
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            r = out.logits.reshape(-1).float()
            n = weight.shape[0]
            rc, rr = r[:n], r[n:]
            loss = pairwise_loss(rc, rr, weight, self.loss_reduction)  # type: ignore[arg-type]
            if return_outputs:
                return loss, {"chosen": rc, "rejected": rr}
            return loss

        def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                            ignore_keys: Any = None) -> Any:
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss, outs = self.compute_loss(model, inputs, return_outputs=True)
            loss = loss.detach()
            if prediction_loss_only:
                return loss, None, None
            logits = torch.stack([outs["chosen"], outs["rejected"]], dim=1).detach()
            return loss, logits, inputs["weight"].detach()

    return PPMTrainer


def __getattr__(name: str) -> Any:
    if name == "PPMTrainer":
        return make_ppm_trainer_class()
    raise AttributeError(name)


def load_ppm_for_training(script: PPMArguments, seed: int) -> Any:
    """A PPM to train: continue an existing PPM directory, else initialise one from the policy."""
    from rstar.ppm import PPM, PPMLoadError, check_ppm_dir
    from rstar.train.common import torch_dtype

    dtype = torch_dtype(script.dtype)
    try:
        check_ppm_dir(script.model)
        is_ppm = True
    except PPMLoadError:
        is_ppm = False
    if is_ppm:
        logger.info("continuing training of the PPM in %s", script.model)
        return PPM.from_pretrained(script.model, dtype=dtype, value_scale=script.value_scale,
                                   attn_implementation=script.attn_implementation)
    logger.info("initialising the PPM from the policy %s (new value head)", script.model)
    return PPM.from_policy(
        script.model, dtype=dtype, value_scale=script.value_scale, head_init_std=script.head_init_std,
        add_step_tokens=script.add_step_tokens, attn_implementation=script.attn_implementation, seed=seed,
    )


def train_ppm(script: PPMArguments, targs: Any) -> TrainResult:
    """Train a PPM on ``script.data`` (pair rows, or trees mined first) and save it to
    ``targs.output_dir`` as a PPM directory (a one-label sequence-classification checkpoint)."""
    from transformers import set_seed

    from rstar.ppm import PPM
    from rstar.train.data import PairCollator, encode_pair_row

    if script.loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be mean or sum, got {script.loss_reduction!r}")
    targs = finalize_training_args(script, targs)
    set_seed(targs.seed)
    ppm = load_ppm_for_training(script, targs.seed)
    tokenizer = ppm.tokenizer
    mining = {"min_margin": script.min_margin, "min_edit_distance": script.min_edit_distance,
              "top_k": script.top_k, "top_k_single": script.top_k_single}
    rows = load_or_mine_rows(script, script.data, "pairs", tokenizer, **mining)
    if script.max_train_rows:
        rows = rows[: script.max_train_rows]
    if script.eval_data:
        train_rows, eval_rows = rows, load_or_mine_rows(script, script.eval_data, "pairs", tokenizer, **mining)
    else:
        train_rows, eval_rows = split_by_problem(rows, script.eval_fraction, script.split_seed)

    def encode(r: dict[str, Any]) -> dict[str, Any]:
        e = encode_pair_row(tokenizer, r, script.max_length)
        e.pop("truncated")
        return e

    train_ds, eval_ds = encode_datasets(script, train_rows, eval_rows, encode, "PPM")
    if train_ds is None:
        raise ValueError(f"no preference pairs to train on in {script.data}")
    logger.info("PPM: %d training pairs, %d held-out pairs", len(train_ds), len(eval_ds) if eval_ds else 0)

    model = ppm.model
    if script.use_lora:
        model = apply_lora(model, script, "SEQ_CLS")
        if targs.gradient_checkpointing:
            model.enable_input_require_grads()
    targs.remove_unused_columns = False
    targs.label_names = ["weight"]
    if eval_ds is None and str(targs.eval_strategy) not in ("no", "IntervalStrategy.NO"):
        logger.warning("no held-out pairs: evaluation disabled")
        targs.eval_strategy = "no"
    trainer_cls = make_ppm_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PairCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        compute_metrics=_pair_metrics,
        callbacks=[make_log_callback()],
        loss_reduction=script.loss_reduction,
    )
    out = trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
    train_metrics = dict(out.metrics)
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    if eval_metrics:
        logger.info("held-out pair accuracy %.4f over %d pairs", eval_metrics.get("eval_pair_accuracy", float("nan")),
                    len(eval_ds))
    if script.use_lora:
        if trainer.is_world_process_zero():  # merge the adapters: the saved PPM is a full model
            PPM(trainer.model, tokenizer, value_scale=script.value_scale).save_pretrained(targs.output_dir)
    else:
        # trainer.save_model gathers FSDP / DeepSpeed shards; the config already carries
        # rstar_ppm and pad_token_id (set by PPM), so the result is a PPM directory
        trainer.save_model(targs.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.save_metrics("train", train_metrics)
        if eval_metrics:
            trainer.save_metrics("eval", eval_metrics)
        write_summary(targs.output_dir, "rstar_train.json", {
            "kind": "ppm", "args": asdict(script), "train": train_metrics, "eval": eval_metrics,
            "train_pairs": len(train_ds), "eval_pairs": len(eval_ds) if eval_ds else 0,
        })
    trainer.accelerator.wait_for_everyone()
    return TrainResult(Path(targs.output_dir), train_metrics, eval_metrics, len(train_ds),
                       len(eval_ds) if eval_ds else 0)
