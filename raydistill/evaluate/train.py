"""Training and scoring fresh networks: the unit every evaluation, validation and baseline is made of.

One network is a pure function of its inputs and its seed: the seed fixes the initialisation (under a forked RNG, so
the caller's global RNG is untouched), the minibatch order and the augmentation draws. On CPU the result is then the
same bit for bit wherever it runs, given the same torch thread count (CPU kernels reduce in an order that depends on
the number of threads).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from raydistill.config import AugmentConfig, DistillConfig, EvalConfig
from raydistill.data.augment import augment
from raydistill.data.registry import Dataset
from raydistill.models.losses import soft_cross_entropy
from raydistill.models.registry import build_network, inference_batch, network_from_seed

Progress = Callable[[], None]

NO_AUGMENTATION = AugmentConfig(strategies=[])


@dataclass
class Accuracy:
    """Test (or validation) accuracy of several networks, in percent."""

    mean: float
    std: float  # population std over the networks
    accs: list[float]

    @classmethod
    def of(cls, accs: list[float]) -> "Accuracy":
        return cls(statistics.fmean(accs), statistics.pstdev(accs) if len(accs) > 1 else 0.0, accs)

    def __str__(self) -> str:
        return f"{self.mean:.2f} +- {self.std:.2f} %"


@dataclass(frozen=True)
class NetworkSpec:
    """One fresh network to train and score: its architecture and classes, the seed it is a pure function of, its
    training steps, and whether it trains with the distillation's augmentation (`cfg.augment`) or with none."""

    arch: str
    num_classes: int
    seed: int
    steps: int
    augmented: bool


@dataclass(frozen=True)
class Networks:
    """`count` fresh `arch` networks (seeds seed, seed + 1, ...), each trained `steps` steps and scored on `split`
    (val or test)."""

    arch: str
    count: int
    steps: int
    split: str
    seed: int


def network_for(arch: str, cfg: DistillConfig, dataset: Dataset) -> torch.nn.Module:
    """A fresh `arch` for `dataset`'s images and classes (initialised from the global RNG)."""
    return build_network(arch, cfg.model, dataset.image_shape, dataset.num_classes)


def fresh_network(arch: str, cfg: DistillConfig, image_shape: tuple[int, ...], num_classes: int,
                  seed: int) -> torch.nn.Module:
    """A fresh `arch` initialised from `seed` alone; the global RNG is left as it was."""
    return network_from_seed(lambda: build_network(arch, cfg.model, image_shape, num_classes), seed)


def train_network(
    model: torch.nn.Module, x: Tensor, targets: Tensor, ev: EvalConfig, aug: AugmentConfig, seed: int, steps: int
) -> torch.nn.Module:
    """Train `model` from scratch on (x, targets) with the evaluation recipe and the augmentation `aug`."""
    rng = torch.Generator().manual_seed(seed)
    batch = min(ev.batch_size, x.shape[0])
    if ev.recipe == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=ev.lr)
        sched = None
    else:  # DC-style: SGD with momentum and weight decay, lr x0.1 at half time
        opt = torch.optim.SGD(model.parameters(), lr=ev.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[steps // 2], gamma=0.1)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(x.shape[0], generator=rng)[:batch].to(x.device)
        xb = augment(x[idx], rng, aug)
        loss = soft_cross_entropy(model(xb), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch: int | None = None) -> float:
    """Top-1 accuracy of `model` on (x, y), in percent; `batch` images per forward (None: `inference_batch`)."""
    model.eval()
    batch = batch or inference_batch(tuple(x.shape[1:]))
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return 100.0 * correct / max(1, x.shape[0])


def split_of(dataset: Dataset, split: str) -> tuple[Tensor, Tensor]:
    """(images, labels) of the `val` split (checkpoint selection, Tune) or the `test` split (the final report only)."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be val or test, got {split!r}")
    return (dataset.val_x, dataset.val_y) if split == "val" else (dataset.test_x, dataset.test_y)


def network_accuracy(
    x: Tensor,
    targets: Tensor,
    eval_x: Tensor,
    eval_y: Tensor,
    spec: NetworkSpec,
    cfg: DistillConfig,
    device: torch.device,
) -> float:
    """Accuracy on (eval_x, eval_y) of one fresh `spec.arch` trained on (x, targets): a pure function of
    `spec.seed`.

    `spec.augmented` trains with the distillation's augmentation (`cfg.augment`), otherwise with none.
    """
    model = fresh_network(spec.arch, cfg, tuple(x.shape[1:]), spec.num_classes, spec.seed).to(device)
    aug = cfg.augment if spec.augmented else NO_AUGMENTATION
    train_network(model, x.to(device), targets.to(device), cfg.eval, aug, spec.seed, spec.steps)
    return accuracy(model, eval_x.to(device), eval_y.to(device))


def evaluate_set(
    x: Tensor,
    targets: Tensor,
    dataset: Dataset,
    cfg: DistillConfig,
    networks: Networks,
    device: torch.device,
    tick: Progress | None = None,
) -> Accuracy:
    """Train `networks` (fresh networks, seeds seed, seed + 1, ...) on (x, targets), with the distillation's
    augmentation; their accuracy on `networks.split` (val or test)."""
    eval_x, eval_y = (t.to(device) for t in split_of(dataset, networks.split))
    x, targets = x.to(device), targets.to(device)
    accs = []
    for i in range(networks.count):
        spec = NetworkSpec(networks.arch, dataset.num_classes, networks.seed + i, networks.steps, augmented=True)
        accs.append(network_accuracy(x, targets, eval_x, eval_y, spec, cfg, device=device))
        if tick:
            tick()
    return Accuracy.of(accs)
