"""DC's original schedule, in one process, for comparison with the seeded episode (benchmarks/bench_methods.py).

As published: a fresh network per iteration; within it, `outer_loop` image updates (SGD with momentum on the images),
and after each but the last, `inner_loop` epochs of training that same network on the synthetic set as it now is.
`steps` counts image updates, the unit of the engine's steps, so both schedules can be compared at equal steps. Not
used by the engine: this network lives across updates, so a task of it would not be a pure function of its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raydistill.methods.base import seeded_network
from raydistill.methods.dc.config import DcConfig
from raydistill.methods.dc.loss import dc_loss
from raydistill.methods.matching import (
    MatchingContext,
    NetSchedule,
    freeze_batchnorm,
    resolved_loops,
    train_on_synthetic,
)


@dataclass(frozen=True)
class ImageSgd:
    """The published loop's optimizer of the synthetic images: SGD with momentum."""

    lr: float
    momentum: float


def original_schedule(ctx: MatchingContext, images: Tensor, hard_labels: Tensor, steps: int, image_opt: ImageSgd,
                      seed: int, siamese: bool = False) -> tuple[Tensor, list[float]]:
    """The synthetic images after `steps` image updates of DC's (or DSA's) published loop, and the loss of each."""
    d: DcConfig = ctx.cfg.method_config
    rng = torch.Generator().manual_seed(seed)
    outer, inner = resolved_loops(d, ctx.cfg.ipc)
    aug = ctx.cfg.augment if siamese else None
    x = images.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=image_opt.lr, momentum=image_opt.momentum)
    losses: list[float] = []
    while len(losses) < steps:
        model = seeded_network(ctx.model_factory, rng, x)
        for ol in range(outer):
            freeze_batchnorm(model, ctx, len(ctx.by_class), rng, x)
            loss = dc_loss(model, x, hard_labels, ctx, d.batch_real, aug, rng)
            (x.grad,) = torch.autograd.grad(loss, x)
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) == steps or ol == outer - 1:
                break
            train_on_synthetic(model, x, hard_labels, NetSchedule(inner, d.lr_net, d.batch_train), rng, aug)
    return x.detach(), losses
