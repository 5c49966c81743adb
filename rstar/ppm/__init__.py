"""The process preference model (PPM): backbone + scalar value head, save/load/export, scorer.

Importing this package imports torch (the model module); the light pieces stay importable
without transformers being touched until a model is built or loaded."""

from __future__ import annotations

from rstar.ppm.loss import pair_accuracy, pairwise_loss
from rstar.ppm.model import (
    PPM,
    PPM_META_KEY,
    PPMLoadError,
    check_ppm_dir,
    checkpoint_tensor_names,
    load_scorer,
    ppm_value_scale,
)

__all__ = [
    "PPM",
    "PPM_META_KEY",
    "PPMLoadError",
    "check_ppm_dir",
    "checkpoint_tensor_names",
    "load_scorer",
    "ppm_value_scale",
    "pair_accuracy",
    "pairwise_loss",
]
