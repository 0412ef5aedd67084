"""Class-wise selection of real images: each class's indices, and a seeded random subset of a data set."""

from __future__ import annotations

import torch
from torch import Tensor

from raydistill.data.registry import Dataset


def class_index(labels: Tensor, num_classes: int) -> list[Tensor]:
    """Indices of each class's examples, on `labels`' device."""
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def random_real_subset(dataset: Dataset, ipc: int, seed: int) -> tuple[Tensor, Tensor]:
    """`ipc` random training images per class, drawn from `seed`."""
    rng = torch.Generator().manual_seed(seed)
    picks = [idx[torch.randperm(len(idx), generator=rng)[:ipc]] for idx in class_index(dataset.train_y, dataset.num_classes)]
    idx = torch.cat(picks)
    return dataset.train_x[idx], dataset.train_y[idx]
