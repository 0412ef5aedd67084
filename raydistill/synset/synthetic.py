"""The synthetic set: its learnable tensors by name, the fixed hard labels, and its initialisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raydistill.config import DistillConfig
from raydistill.data.registry import Dataset
from raydistill.data.selection import random_real_subset
from raydistill.methods.base import IMAGES, SOFT_LABELS, Method


@dataclass
class SyntheticSet:
    learnables: dict[str, Tensor]  # "images" (n, C, H, W), "soft_labels" (n, classes) when learned, a method's own
    hard_labels: Tensor  # (n,) class of each example, class-major
    blocks: Tensor | None = None  # Boost-DD block of each image (None: one block)
    lr_scale: Tensor | None = None  # meta lr multiplier of each image (None: all 1)

    @property
    def images(self) -> Tensor:
        return self.learnables[IMAGES]

    @property
    def soft_labels(self) -> Tensor | None:
        return self.learnables.get(SOFT_LABELS)

    def arrays(self) -> dict[str, np.ndarray]:
        """The learnables as float32 numpy arrays (what crosses process boundaries)."""
        return {name: t.detach().cpu().numpy() for name, t in self.learnables.items()}


def init_synthetic(cfg: DistillConfig, dataset: Dataset, method: Method) -> SyntheticSet:
    """IPC images per class, class-major: Gaussian noise scaled to unit L2 norm per image, or real samples."""
    hard = torch.arange(dataset.num_classes).repeat_interleave(cfg.ipc)
    if cfg.init.mode == "real":
        images, _ = random_real_subset(dataset, cfg.ipc, seed=cfg.seed)
    else:
        rng = torch.Generator().manual_seed(cfg.seed)
        images = torch.randn(len(hard), *dataset.image_shape, generator=rng)
        images = images / images.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    learnables = {IMAGES: images.clone()}
    if SOFT_LABELS in method.learnables(cfg):
        learnables[SOFT_LABELS] = F.one_hot(hard, dataset.num_classes).float()
    learnables.update(method.init_extra(cfg, dataset.num_classes))
    return SyntheticSet(learnables, hard)
