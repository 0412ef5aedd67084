"""The validation score that picks the checkpoint and drives Tune, and the Validator that keeps its split loaded.

A validation trains a few short networks on a snapshot and scores them on the val split; the test split never enters
here (it is for the final report only, `report.py`). A `Validator` holds the validation split (on its device, uint8)
for the life of a run, so each snapshot costs only its networks. The engine runs one as an actor
(raydistill.engine.worker.ValidatorActor), fed from the driver's copy of the data in Ray's object store.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raydistill.config import DistillConfig
from raydistill.data.real import RealImages
from raydistill.data.registry import Dataset
from raydistill.evaluate.train import Networks, evaluate_set
from raydistill.runtime import as_tensor

VALIDATION_SEED = 30_000  # cfg.seed + this + i: validation network i (apart from the report's networks)


def validation_accuracy(images: Tensor, hard_labels: Tensor, soft_labels: Tensor | None, dataset: Dataset,
                        cfg: DistillConfig, device: torch.device) -> float:
    """Mean val-split accuracy (percent) of `cfg.eval.val_models` fresh `cfg.model.name` networks, each trained
    `cfg.eval.val_steps` steps on the snapshot (on its soft labels when it has them); the same for the same seed."""
    targets = soft_labels if soft_labels is not None else hard_labels
    networks = Networks(cfg.model.name, cfg.eval.val_models, cfg.eval.val_steps, "val", seed=cfg.seed + VALIDATION_SEED)
    acc = evaluate_set(images, targets, dataset, cfg, networks, device=device)
    return acc.mean


def validation_only(dataset: Dataset, val_x: RealImages | Tensor, val_y: Tensor) -> Dataset:
    """`dataset` with only a validation split: empty train and test splits that still carry the image shape
    networks are built from (a validator lives as long as its run)."""
    empty = torch.empty(0, *val_x.shape[1:])
    no_labels = torch.empty(0, dtype=torch.int64)
    return Dataset(dataset.name, empty, no_labels, val_x, val_y, empty, no_labels, list(dataset.class_names),
                   dataset.mean, dataset.std, dataset.zca)


class Validator:
    """Validation accuracy of snapshots on `device`, with the validation split of `dataset` kept there."""

    def __init__(self, cfg: DistillConfig, dataset: Dataset, device: torch.device):
        self.cfg, self.device = cfg, device
        self.dataset = validation_only(dataset, dataset.val_x.to(device), dataset.val_y.to(device))

    def validate(self, snapshot: dict) -> float:
        """Mean validation accuracy (percent) of fresh networks trained on the snapshot's images and labels."""
        images, hard, soft = (as_tensor(snapshot.get(k), self.device) for k in ("images", "hard_labels", "soft_labels"))
        return validation_accuracy(images, hard, soft, self.dataset, self.cfg, self.device)
