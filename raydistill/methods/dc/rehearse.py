"""One DC (or DSA) gradient task, rehearsed on the meta device for the memory planner (raydistill.plan).

It runs dc_gradient's phases with their own code: the seeded episode's network training (matching.py's
`train_on_synthetic`), DC's BatchNorm rule (`freeze_batchnorm`: a no-grad forward of 16 real images per class), then
dc/loss.py's `dc_loss`, which keeps, for every class, the synthetic batch's parameter gradients with the graph of
their own backward pass (create_graph) until the gradient with respect to the images is taken: the matching loss
and the backward pass are linear in the classes (raydistill/methods/matching_rehearsal.py).
"""

from __future__ import annotations

import torch

from raydistill.config.schema import DistillConfig
from raydistill.methods.dc.loss import dc_loss
from raydistill.methods.matching import freeze_batchnorm
from raydistill.methods.matching_rehearsal import Body, Rehearsal, costliest_strategy, episode, rehearse_task
from raydistill.methods.rehearsal import DataShape, PhaseRecorder, TaskMemory


def task_phases(siamese: bool) -> Body:
    """dc_gradient's phases after its network's (`siamese`: DSA's): "episode" (when trained), "batchnorm",
    "matching loss" and "backward"."""

    def body(rec: PhaseRecorder, r: Rehearsal) -> None:
        aug = r.cfg.augment if siamese else None
        episode(rec, r, r.cfg.method_config, aug)
        with rec.phase("batchnorm"):
            freeze_batchnorm(r.model, r.ctx, len(r.ctx.by_class), r.rng, r.images)
        with rec.phase("matching loss"):
            loss = dc_loss(r.model, r.images, r.hard, r.ctx, r.cfg.method_config.batch_real, aug, r.rng)
        with rec.phase("backward"):
            torch.autograd.grad(loss, r.images)

    return body


def rehearse(cfg: DistillConfig, shape: DataShape, siamese: bool) -> TaskMemory:
    """The peak bytes of one DC (`siamese`: DSA) gradient task for `cfg` on data of `shape`, and its terms."""
    strategy = costliest_strategy(cfg, shape) if siamese else None
    return rehearse_task(cfg, shape, task_phases(siamese), strategy)
