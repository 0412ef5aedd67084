"""One DM gradient task, rehearsed on the meta device for the memory planner (raydistill.plan).

It runs dm/loss.py's own `dm_loss` on a network that is never trained: each class's real batch is embedded without a
graph (a transient) and its synthetic images with one, which stays until the backward pass. Two phases, the
matching loss (every class's graph, plus one class's real batch at a time) and the backward pass, both linear in
the classes (raydistill/methods/matching_rehearsal.py).
"""

from __future__ import annotations

import torch

from raydistill.config.schema import DistillConfig
from raydistill.methods.dm.loss import dm_loss
from raydistill.methods.matching_rehearsal import Rehearsal, costliest_strategy, rehearse_task
from raydistill.methods.rehearsal import DataShape, PhaseRecorder, TaskMemory


def task_phases(rec: PhaseRecorder, r: Rehearsal) -> None:
    """dm_gradient's phases after its network's: "matching loss" and "backward"."""
    r.model.requires_grad_(False)
    with rec.phase("matching loss"):
        loss = dm_loss(r.model, r.images, r.hard, r.ctx, r.cfg.method_config.batch_real, r.cfg.augment, r.rng)
    with rec.phase("backward"):
        torch.autograd.grad(loss, r.images)


def rehearse(cfg: DistillConfig, shape: DataShape) -> TaskMemory:
    """The peak bytes of one DM gradient task for `cfg` on data of `shape`, and its terms."""
    return rehearse_task(cfg, shape, task_phases, costliest_strategy(cfg, shape))
