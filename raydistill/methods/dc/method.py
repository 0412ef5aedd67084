"""DC and DSA as Methods: one task = one image update of the original, on a seeded episode network.

A task draws a fresh network from its seed, an outer iteration k uniform in [0, outer_loop), trains the network
k x inner_loop epochs on the snapshot (no graph), and returns the gradient of the matching loss (dc/loss.py) with
respect to the synthetic images; the stats record k and the epochs (`episode`, `net_epochs`). See
raydistill/methods/matching.py for why the original's network, trained along between outer iterations, becomes this
seeded episode, and dc/original.py for the original schedule, kept in one process for comparison.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from raydistill.config.errors import ConfigError
from raydistill.config.schema import DistillConfig
from raydistill.methods.base import IMAGES, Gradient, Method, WorkerResources, seeded_network, task_seed
from raydistill.methods.dc.config import DcConfig, validate_section
from raydistill.methods.dc.loss import dc_loss
from raydistill.methods.dc.rehearse import rehearse
from raydistill.methods.matching import (
    MatchingContext,
    NetSchedule,
    episode_position,
    freeze_batchnorm,
    make_context,
    resolved_loops,
    train_on_synthetic,
    validate_common,
    validate_real_batch,
)
from raydistill.methods.rehearsal import DataShape, TaskMemory


def dc_gradient(ctx: MatchingContext, images: Tensor, hard_labels: Tensor, seed: int,
                siamese: bool) -> tuple[Tensor, float, dict]:
    """(d loss / d images, loss, stats) of one DC (or, with `siamese`, DSA) task; a pure function of its inputs."""
    d: DcConfig = ctx.cfg.method_config
    rng = torch.Generator().manual_seed(seed)
    outer, inner = resolved_loops(d, ctx.cfg.ipc)
    aug = ctx.cfg.augment if siamese else None
    model = seeded_network(ctx.model_factory, rng, images)
    k, epochs = episode_position(rng, outer, inner)
    train_on_synthetic(model, images, hard_labels, NetSchedule(epochs, d.lr_net, d.batch_train), rng, aug)
    freeze_batchnorm(model, ctx, len(ctx.by_class), rng, images)
    images = images.detach().requires_grad_(True)
    loss = dc_loss(model, images, hard_labels, ctx, d.batch_real, aug, rng)
    (grad,) = torch.autograd.grad(loss, images)
    return grad, float(loss.detach()), {"episode": k, "net_epochs": epochs}


class GradientMatching(Method):
    """Dataset condensation with gradient matching (Zhao, Mopuri & Bilen, ICLR 2021)."""

    name = "dc"
    config_cls = DcConfig
    siamese = False  # DSA: the same augmentation on the real and the synthetic batch of a class

    def validate(self, section: DcConfig, cfg: DistillConfig) -> None:
        validate_section(section, self.name)
        validate_common(cfg, self.name)
        if self.siamese and not cfg.augment.strategies:
            raise ConfigError("augment.strategies: dsa needs at least one augmentation (DSA's: [color, crop, "
                              "cutout, flip, scale, rotate]); set it, or use method=dc")

    def validate_against_data(self, section: DcConfig, cfg: DistillConfig, num_train: int, num_classes: int) -> None:
        validate_real_batch(section.batch_real, self.name, num_train, num_classes)

    def setup(self, cfg: DistillConfig, resources: WorkerResources) -> MatchingContext:
        return make_context(cfg, resources)

    def gradient(self, context: MatchingContext, learnables: dict[str, Tensor], hard_labels: Tensor, step: int,
                 slot: int, slot_state: dict[str, np.ndarray] | None) -> Gradient:
        seed = task_seed(context.cfg.seed, step, slot)
        grad, loss, stats = dc_gradient(context, learnables[IMAGES], hard_labels, seed, self.siamese)
        return Gradient({IMAGES: grad}, loss, stats)

    def rehearse(self, cfg: DistillConfig, shape: DataShape) -> TaskMemory:
        return rehearse(cfg, shape, self.siamese)

    def describe(self, d: DcConfig) -> str:
        loops = "by ipc" if d.outer_loop is None and d.inner_loop is None else f"{d.outer_loop}/{d.inner_loop}"
        return f"{self.name} loops={loops} lr_net={d.lr_net} batch_real={d.batch_real}"


class SiameseGradientMatching(GradientMatching):
    """DC with differentiable Siamese augmentation (Zhao & Bilen, ICML 2021)."""

    name = "dsa"
    siamese = True
