"""What the matching methods (DM, CAFE, DC/DSA) share: seeded networks, per-class real batches, Siamese
augmentation, and the seeded training episode.

A gradient task must stay a pure function of (snapshot, step, slot): that is what makes a retried task recompute the
same gradient and gives the engine its exactly-once steps. The published DC, DSA and CAFE algorithms instead keep one
network alive across `outer_loop` image updates and train it `inner_loop` epochs on the synthetic set between them.
Here that network becomes a *seeded episode*: a fresh init drawn from the task's generator, a position k drawn
uniformly from [0, outer_loop), and k x inner_loop no-graph training epochs on the current snapshot; the matching loss
is then taken on that network. Every image update thus sees a network at a position the original would have reached,
and the position is recorded in the task's statistics. Two things differ from the original: the network is trained
on the current snapshot rather than on the snapshots of the earlier outer iterations, and a task costs on average
(outer_loop - 1) / 2 x inner_loop training epochs instead of inner_loop. DM keeps no network, so a DM task is exactly
one published iteration.

Every random choice comes from one CPU generator seeded by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydistill.config.checks import positive
from raydistill.config.errors import ConfigError
from raydistill.config.schema import AugmentConfig, DistillConfig
from raydistill.data.augment import AugParams, apply_params, augment, siamese_params
from raydistill.data.selection import class_index
from raydistill.methods.base import ModelFactory, WorkerResources

# DC's outer_loop / inner_loop by images per class (Zhao, Mopuri & Bilen, ICLR 2021; the official repo's get_loops).
PUBLISHED_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
BN_IMAGES_PER_CLASS = 16  # DC: real images per class that set BatchNorm's statistics before they are frozen


@dataclass
class EpisodeConfig:
    """The network schedule DC, DSA and CAFE share (fields of their config sections)."""

    outer_loop: int | None = None  # image updates per network; None: DC's published value for the IPC
    inner_loop: int | None = None  # network epochs on the synthetic set between image updates; None: published
    lr_net: float = 0.01  # SGD (no momentum) on the network, as published
    batch_train: int = 256  # synthetic images per network training batch
    batch_real: int = 256  # real images per class in each matching term


def published_loops(ipc: int) -> tuple[int, int]:
    """DC's (outer_loop, inner_loop) for `ipc`; an IPC without a published value takes the nearest published one
    (ties: the smaller), so Boost-DD stages at any IPC run."""
    nearest = min(PUBLISHED_LOOPS, key=lambda k: (abs(k - ipc), k))
    return PUBLISHED_LOOPS[nearest]


def resolved_loops(section: EpisodeConfig, ipc: int) -> tuple[int, int]:
    outer, inner = published_loops(ipc)
    return (section.outer_loop or outer, section.inner_loop or inner)


def validate_episode(section: EpisodeConfig, name: str) -> None:
    for field in ("outer_loop", "inner_loop"):
        value = getattr(section, field)
        if value is not None:
            positive(value, f"{name}.{field}")
    positive(section.lr_net, f"{name}.lr_net")
    positive(section.batch_train, f"{name}.batch_train")
    positive(section.batch_real, f"{name}.batch_real")


def validate_common(cfg: DistillConfig, name: str) -> None:
    """What every matching method needs of the method-neutral config."""
    if cfg.labels.learn:
        raise ConfigError(f"labels.learn: {name} matches hard-labelled classes and learns images only; "
                          "set labels.learn=false")


def validate_real_batch(batch_real: int, name: str, num_train: int, num_classes: int) -> None:
    per_class = num_train // max(num_classes, 1)
    if batch_real > num_train:
        raise ConfigError(f"{name}.batch_real: {batch_real} real images per class, but the training split has "
                          f"{num_train} images (about {per_class} per class); set {name}.batch_real <= {per_class}")


@dataclass
class MatchingContext:
    """A worker's set-up: the config, the real training data by class, and the model factory."""

    cfg: DistillConfig
    real_x: Tensor
    real_y: Tensor
    by_class: list[Tensor]  # indices of the real images of each class (on real_x's device)
    model_factory: ModelFactory


def make_context(cfg: DistillConfig, resources: WorkerResources) -> MatchingContext:
    x, y = resources.train_x, resources.train_y
    return MatchingContext(cfg, x, y, class_index(y, resources.num_classes), resources.model_factory)


def real_batch(ctx: MatchingContext, c: int, n: int, rng: torch.Generator, like: Tensor) -> Tensor:
    """n random real images of class c (all of them when the class has fewer), in `like`'s dtype."""
    idx = ctx.by_class[c]
    pick = idx[torch.randperm(len(idx), generator=rng)[:n].to(idx.device)]
    return ctx.real_x[pick].to(like.dtype)


def siamese_pair(real: Tensor, syn: Tensor, rng: torch.Generator, aug: AugmentConfig | None) -> tuple[Tensor, Tensor]:
    """The real and the synthetic batch of one class under the same augmentation (one strategy, one parameter set);
    `aug` None or without strategies leaves both unchanged and draws nothing."""
    params: AugParams | None = None if aug is None else siamese_params(rng, aug)
    return apply_params(real, params), apply_params(syn, params)


def synthetic_of_class(hard_labels: Tensor, c: int) -> Tensor:
    return torch.nonzero(hard_labels == c).flatten()


def episode_position(rng: torch.Generator, outer_loop: int, inner_loop: int) -> tuple[int, int]:
    """(k, epochs): the outer iteration k drawn uniformly from [0, outer_loop) and the k x inner_loop network
    epochs the original would have run before it."""
    k = int(torch.randint(0, outer_loop, (1,), generator=rng))
    return k, k * inner_loop


@dataclass(frozen=True)
class NetSchedule:
    """How a matching method trains its network on the synthetic set: `epochs` passes of plain SGD at `lr` in
    shuffled batches of `batch`."""

    epochs: int
    lr: float
    batch: int


def train_on_synthetic(model: nn.Module, images: Tensor, labels: Tensor, schedule: NetSchedule,
                       rng: torch.Generator, aug: AugmentConfig | None) -> None:
    """`schedule.epochs` passes of plain SGD (no momentum) over the synthetic set in shuffled batches, in place, no
    graph into the images; with `aug`, each batch is augmented with per-image parameters (DSA's network training)."""
    epochs, batch = schedule.epochs, schedule.batch
    if epochs <= 0:
        return
    images, labels = images.detach(), labels.detach()
    opt = torch.optim.SGD(model.parameters(), lr=schedule.lr)
    model.train()
    n = images.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=rng).to(images.device)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            x = images[idx] if aug is None else augment(images[idx], rng, aug)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def freeze_batchnorm(model: nn.Module, ctx: MatchingContext, num_classes: int, rng: torch.Generator,
                     like: Tensor) -> bool:
    """DC's BatchNorm rule: set the running statistics from BN_IMAGES_PER_CLASS real images of every class, then
    put every BatchNorm layer in eval mode so the matching batches use those statistics. False: no BatchNorm."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    x = torch.cat([real_batch(ctx, c, BN_IMAGES_PER_CLASS, rng, like) for c in range(num_classes)])
    model.train()
    with torch.no_grad():
        model(x)
    for m in norms:
        m.eval()
    return True


def present_classes(hard_labels: Tensor) -> list[int]:
    return [int(c) for c in torch.unique(hard_labels.cpu()).tolist()]
