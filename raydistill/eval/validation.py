"""The validation score that picks the checkpoint and drives Tune: a few short-trained networks on the val split.

The test split never enters here; it is for the final report only (`report.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from raydistill.config import DistillConfig
from raydistill.data.registry import Dataset
from raydistill.eval.train import evaluate_set

VALIDATION_SEED = 30_000  # cfg.seed + this + i: validation network i (apart from the report's networks)


def validation_accuracy(images: Tensor, hard_labels: Tensor, soft_labels: Tensor | None, dataset: Dataset,
                        cfg: DistillConfig, device: torch.device) -> float:
    """Mean val-split accuracy (percent) of `cfg.eval.val_models` fresh `cfg.model.name` networks, each trained
    `cfg.eval.val_steps` steps on the snapshot (on its soft labels when it has them); the same for the same seed."""
    targets = soft_labels if soft_labels is not None else hard_labels
    acc = evaluate_set(images, targets, dataset, cfg, cfg.model.name, cfg.eval.val_models, cfg.eval.val_steps, "val",
                       seed=cfg.seed + VALIDATION_SEED, device=device)
    return acc.mean
