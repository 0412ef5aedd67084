"""Fair evaluation: train fresh networks on a (distilled or real) set, report mean +- std of their accuracy.

Checkpoint selection uses the validation split; the test split is for the final report only. Every report carries a
random real subset of the same size, trained the same way, so the gain from distillation is visible.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from raydistill.data.augment import augment
from raydistill.config.core import AugmentConfig, DistillConfig, EvalConfig
from raydistill.data.registry import Dataset
from raydistill.methods.ratbptt.meta_gradient import soft_cross_entropy
from raydistill.models.registry import create_model

Progress = Callable[[], None]


@dataclass
class Accuracy:
    mean: float  # percent
    std: float
    accs: list[float]

    @classmethod
    def of(cls, accs: list[float]) -> "Accuracy":
        return cls(statistics.fmean(accs), statistics.pstdev(accs) if len(accs) > 1 else 0.0, accs)

    def __str__(self) -> str:
        return f"{self.mean:.2f} +- {self.std:.2f} %"


def network_for(arch: str, cfg: DistillConfig, dataset: Dataset) -> torch.nn.Module:
    c, h, _ = dataset.image_shape
    m = cfg.model
    return create_model(arch, c, dataset.num_classes, h, width=m.width, depth=m.depth, norm=m.norm)


def train_network(
    model: torch.nn.Module, x: Tensor, targets: Tensor, ev: EvalConfig, aug: AugmentConfig, seed: int, steps: int
) -> torch.nn.Module:
    """Train `model` from scratch on (x, targets) with the evaluation recipe and the distillation's augmentation."""
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
        xb = augment(x[idx], rng, aug.strategies, aug.rotate_degrees)
        loss = soft_cross_entropy(model(xb), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch: int = 2048) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return 100.0 * correct / max(1, x.shape[0])


def evaluate_set(
    x: Tensor,
    targets: Tensor,
    dataset: Dataset,
    cfg: DistillConfig,
    arch: str,
    num_models: int,
    steps: int,
    split: str,
    seed: int,
    device: torch.device,
    tick: Progress | None = None,
) -> Accuracy:
    """Train `num_models` fresh `arch` networks on (x, targets); their accuracy on `split` (val or test)."""
    eval_x, eval_y = (dataset.val_x, dataset.val_y) if split == "val" else (dataset.test_x, dataset.test_y)
    eval_x, eval_y = eval_x.to(device), eval_y.to(device)
    x, targets = x.to(device), targets.to(device)
    accs = []
    for i in range(num_models):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            model = network_for(arch, cfg, dataset).to(device)
        train_network(model, x, targets, cfg.eval, cfg.augment, seed + i, steps)
        accs.append(accuracy(model, eval_x, eval_y))
        if tick:
            tick()
    return Accuracy.of(accs)


def random_real_subset(dataset: Dataset, ipc: int, seed: int) -> tuple[Tensor, Tensor]:
    """`ipc` random training images per class: the baseline every report shows."""
    rng = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(dataset.num_classes):
        idx = torch.nonzero(dataset.train_y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=rng)[:ipc]])
    idx = torch.cat(picks)
    return dataset.train_x[idx], dataset.train_y[idx]


def evaluation_report(
    x: Tensor,
    targets: Tensor,
    ipc: int,
    dataset: Dataset,
    cfg: DistillConfig,
    device: torch.device,
    archs: list[str] | None = None,
    num_models: int | None = None,
    split: str = "test",
    tick: Progress | None = None,
) -> dict:
    """Accuracy of the distilled set and of a same-size random real subset, per architecture (the eval.json body)."""
    archs = archs or cfg.eval.archs
    num_models = num_models or cfg.eval.num_models
    base_x, base_y = random_real_subset(dataset, ipc, seed=cfg.seed + 10_000)
    results, baseline = {}, {}
    for arch in archs:
        common = dict(dataset=dataset, cfg=cfg, arch=arch, num_models=num_models, steps=cfg.eval.steps,
                      split=split, seed=cfg.seed + 20_000, device=device, tick=tick)
        results[arch] = asdict(evaluate_set(x, targets, **common))
        baseline[arch] = asdict(evaluate_set(base_x, base_y, **common))
    return {
        "split": split,
        "ipc": ipc,
        "num_models": num_models,
        "steps": cfg.eval.steps,
        "recipe": cfg.eval.recipe,
        "lr": cfg.eval.lr,
        "results": results,
        "baseline": baseline,
    }


def format_report(report: dict) -> str:
    lines = [f"{report['split']} accuracy, IPC {report['ipc']}, {report['num_models']} networks each:"]
    for arch, res in report["results"].items():
        base = report["baseline"][arch]
        lines.append(
            f"  {arch}: distilled {Accuracy(**res)}   random real subset {Accuracy(**base)}   "
            f"gain {res['mean'] - base['mean']:+.2f} points"
        )
    return "\n".join(lines)
