"""DM as a Method: one task = a network initialised from the task seed, the DM loss over every class, its gradient
with respect to the synthetic images."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from raydistill.config.schema import DistillConfig
from raydistill.methods.base import IMAGES, Gradient, Method, WorkerResources, seeded_network, task_seed
from raydistill.methods.dm.config import DmConfig, validate_section
from raydistill.methods.dm.loss import dm_loss
from raydistill.methods.dm.rehearse import rehearse
from raydistill.methods.matching import MatchingContext, make_context, validate_common, validate_real_batch
from raydistill.methods.rehearsal import DataShape, TaskMemory


def dm_gradient(ctx: MatchingContext, images: Tensor, hard_labels: Tensor, seed: int) -> tuple[Tensor, float]:
    """(d loss / d images, loss) of one DM task; a pure function of its inputs and `seed`."""
    rng = torch.Generator().manual_seed(seed)
    model = seeded_network(ctx.model_factory, rng, images)
    model.requires_grad_(False)  # DM never trains the network: no parameter gradients to compute
    images = images.detach().requires_grad_(True)
    loss = dm_loss(model, images, hard_labels, ctx, ctx.cfg.method_config.batch_real, ctx.cfg.augment, rng)
    (grad,) = torch.autograd.grad(loss, images)
    return grad, float(loss.detach())


class DistributionMatching(Method):
    """Dataset condensation with distribution matching (Zhao & Bilen, WACV 2023)."""

    name = "dm"
    config_cls = DmConfig

    def validate(self, section: DmConfig, cfg: DistillConfig) -> None:
        validate_section(section)
        validate_common(cfg, self.name)

    def validate_against_data(self, section: DmConfig, cfg: DistillConfig, num_train: int, num_classes: int) -> None:
        validate_real_batch(section.batch_real, self.name, num_train, num_classes)

    def setup(self, cfg: DistillConfig, resources: WorkerResources) -> MatchingContext:
        return make_context(cfg, resources)

    def gradient(self, context: MatchingContext, learnables: dict[str, Tensor], hard_labels: Tensor, step: int,
                 slot: int, slot_state: dict[str, np.ndarray] | None) -> Gradient:
        cfg = context.cfg
        grad, loss = dm_gradient(context, learnables[IMAGES], hard_labels, task_seed(cfg.seed, step, slot))
        return Gradient({IMAGES: grad}, loss, {})

    def rehearse(self, cfg: DistillConfig, shape: DataShape) -> TaskMemory:
        return rehearse(cfg, shape)

    def describe(self, d: DmConfig) -> str:
        return f"dm batch_real={d.batch_real}"
