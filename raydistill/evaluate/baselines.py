"""Real-image baselines of the same size as the distilled set: a random subset, and the herding and k-center coresets.

A baseline is what distillation must beat; coresets are baselines here, not distillation methods. Every
selection takes `ipc` distinct training images per class, class-major, and is deterministic given its seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raydistill.config import DistillConfig
from raydistill.data.registry import Dataset
from raydistill.data.selection import random_real_subset  # noqa: F401  (a baseline: re-exported)
from raydistill.evaluate.train import fresh_network

RANDOM, HERDING, KCENTER = "random", "herding", "kcenter"  # the values of cfg.eval.baselines


def herding_indices(features: Tensor, ipc: int) -> Tensor:
    """Greedy mean matching (Welling's herding): `ipc` distinct rows whose running mean tracks the mean of all rows.

    Pick k is the unpicked row i minimising || mean - (sum of picks + f_i) / k ||; ties go to the lowest index.
    """
    f = features.double()
    mean = f.mean(0)
    total = torch.zeros_like(mean)
    taken = torch.zeros(len(f), dtype=torch.bool)
    picks = []
    for k in range(1, min(ipc, len(f)) + 1):
        gap = (mean - (total + f) / k).norm(dim=1)
        gap[taken] = float("inf")
        i = int(gap.argmin())
        picks.append(i)
        taken[i] = True
        total = total + f[i]
    return torch.tensor(picks, dtype=torch.long)


def kcenter_indices(features: Tensor, ipc: int) -> Tensor:
    """Greedy k-center (farthest-point traversal): start at the row nearest the mean, then repeatedly take the row
    farthest from its nearest pick. Ties go to the lowest index; picked rows are at distance 0, so never repeat."""
    f = features.double()
    first = int((f - f.mean(0)).norm(dim=1).argmin())
    picks = [first]
    nearest = (f - f[first]).norm(dim=1)  # distance of each row to its nearest pick
    for _ in range(min(ipc, len(f)) - 1):
        i = int(nearest.argmax())
        picks.append(i)
        nearest = torch.minimum(nearest, (f - f[i]).norm(dim=1))
    return torch.tensor(picks, dtype=torch.long)


SELECTORS = {HERDING: herding_indices, KCENTER: kcenter_indices}


@torch.no_grad()
def embed(model: torch.nn.Module, x: Tensor, device: torch.device, batch: int = 1024) -> Tensor:
    """`model.features` of every image in `x`, in eval mode, gathered on the CPU."""
    model.eval()
    return torch.cat([model.features(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


def coreset(name: str, dataset: Dataset, ipc: int, cfg: DistillConfig, arch: str, seed: int,
            device: torch.device) -> tuple[Tensor, Tensor]:
    """The `name` coreset (herding or kcenter): `ipc` training images per class, selected per class in the embedding
    (`features`) of a fresh, untrained `arch` network initialised from `seed`.

    The field's coreset baselines (DC, DC-bench) embed with a network trained on the whole training set; an untrained
    network keeps the baseline free of any training recipe and exactly reproducible, at the price of a weaker
    embedding, so read these figures as coresets in a random-feature space.
    """
    model = fresh_network(arch, cfg, dataset.image_shape, dataset.num_classes, seed).to(device)
    select = SELECTORS[name]
    picks = []
    for c in range(dataset.num_classes):
        idx = torch.nonzero(dataset.train_y == c).flatten()
        picks.append(idx[select(embed(model, dataset.train_x[idx], device), ipc)])
    idx = torch.cat(picks)
    return dataset.train_x[idx], dataset.train_y[idx]
