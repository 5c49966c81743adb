"""The PPM's pairwise ranking loss (paper eq. 5, official ``train/rm.py``)."""

from __future__ import annotations

from typing import Any, Literal


def pairwise_loss(
    chosen: Any,
    rejected: Any,
    weight: Any = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> Any:
    """``-log σ(r_chosen - r_rejected)`` per pair, times ``weight`` (1/(pos·neg), so a prompt with
    many pairs does not dominate), reduced over the batch.

    ``"mean"`` divides the weighted sum by the number of pairs (a learning-rate rescale of the
    official code's ``"sum"``, which makes the loss scale independent of the batch size).
    Computed with ``logsigmoid`` for stability at large margins."""
    import torch.nn.functional as F

    losses = -F.logsigmoid(chosen.float() - rejected.float())
    if weight is not None:
        losses = losses * weight.to(losses.dtype)
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def pair_accuracy(chosen: Any, rejected: Any) -> float:
    """Fraction of pairs ranked correctly (``r_chosen > r_rejected``; ties count as wrong)."""
    return float((chosen > rejected).float().mean())
