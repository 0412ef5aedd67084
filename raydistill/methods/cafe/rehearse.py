"""One CAFE gradient task, rehearsed on the meta device for the memory planner (raydistill.plan).

It runs cafe_gradient's phases with their own code: the seeded episode's network training (matching.py's
`train_on_synthetic`), then cafe/loss.py's `cafe_loss`. The loss keeps every class's synthetic graph and real
embeddings (batch_real x the embedding) until its end, where the discrimination term classifies all the real
embeddings by the class centres: logits of (classes x batch_real) x classes, quadratic in the classes. So the loss
is split in two phases at the last matched block's output (forward hooks, as the loss's own): the class loop,
linear in the classes, and the discrimination, quadratic; each phase is extrapolated along a parabola through
rehearsals at 2, 3 and 4 classes (raydistill/methods/matching_rehearsal.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from raydistill.config.schema import DistillConfig
from raydistill.memory import LiveBytes
from raydistill.methods.cafe.loss import cafe_loss, matched_layers
from raydistill.methods.matching_rehearsal import Rehearsal, costliest_strategy, episode, rehearse_task
from raydistill.methods.rehearsal import DataShape, Phase, PhaseRecorder, TaskMemory


class _Marks:
    """A forward hook for the matched blocks: the peak of the class loop up to each block's output, and the live
    bytes at the last output, after which the discrimination term runs."""

    def __init__(self, meter: LiveBytes):
        self.meter = meter
        self.loop_peak = 0
        self.live = 0

    def __call__(self, _module: nn.Module, _inputs: tuple, _output: Tensor) -> None:
        self.loop_peak = max(self.loop_peak, self.meter.peak)
        self.meter.reset_peak()
        self.live = self.meter.live


def task_phases(rec: PhaseRecorder, r: Rehearsal) -> None:
    """cafe_gradient's phases after its network's: "episode" (when trained), "matching loss" (the class loop),
    "discrimination" (the rest of the loss) and "backward"."""
    section = r.cfg.method_config
    aug = r.cfg.augment if r.cfg.augment.strategies else None
    episode(rec, r, section, aug)
    r.model.requires_grad_(False)
    marks = _Marks(rec.meter)
    handles = [layer.register_forward_hook(marks) for layer in matched_layers(r.model)]
    try:
        with rec.phase("matching loss"):
            loss, _, _ = cafe_loss(r.model, r.images, r.hard, r.ctx, section, aug, r.rng)
    finally:
        for h in handles:
            h.remove()
    loop = rec.phases["matching loss"]
    rec.phases["discrimination"] = Phase(start=marks.live, end=loop.end, peak=loop.peak)
    loop.peak = marks.loop_peak
    with rec.phase("backward"):
        torch.autograd.grad(loss, r.images)


def rehearse(cfg: DistillConfig, shape: DataShape) -> TaskMemory:
    """The peak bytes of one CAFE gradient task for `cfg` on data of `shape`, and its terms."""
    return rehearse_task(cfg, shape, task_phases, costliest_strategy(cfg, shape), points=3)
