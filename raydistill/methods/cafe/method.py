"""CAFE as a Method: one task = one image update on a seeded episode network (raydistill/methods/matching.py).

CAFE trains its network on the synthetic set between image updates and stops each loop when an accuracy watcher on
real data settles (its "dynamic bi-level optimisation", thresholds lambda_1 / lambda_2). A task here is a pure
function of its step instead: a fresh network from the task seed, an outer iteration k uniform in [0, outer_loop),
k x inner_loop epochs on the snapshot with DC's fixed loops (the table CAFE's code also loads), then the CAFE loss.
The stats record k (`episode`), the epochs and the two terms.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from raydistill.config.schema import DistillConfig
from raydistill.methods.base import IMAGES, Gradient, Method, WorkerResources, seeded_network, task_seed
from raydistill.methods.cafe.config import CafeConfig, validate_section
from raydistill.methods.cafe.loss import cafe_loss
from raydistill.methods.cafe.rehearse import rehearse
from raydistill.methods.matching import (
    MatchingContext,
    NetSchedule,
    episode_position,
    make_context,
    resolved_loops,
    train_on_synthetic,
    validate_common,
    validate_real_batch,
)
from raydistill.methods.rehearsal import DataShape, TaskMemory


def cafe_gradient(ctx: MatchingContext, images: Tensor, hard_labels: Tensor, seed: int) -> tuple[Tensor, float, dict]:
    """(d loss / d images, loss, stats) of one CAFE task; a pure function of its inputs and `seed`."""
    section: CafeConfig = ctx.cfg.method_config
    rng = torch.Generator().manual_seed(seed)
    outer, inner = resolved_loops(section, ctx.cfg.ipc)
    aug = ctx.cfg.augment if ctx.cfg.augment.strategies else None
    model = seeded_network(ctx.model_factory, rng, images)
    k, epochs = episode_position(rng, outer, inner)
    train_on_synthetic(model, images, hard_labels, NetSchedule(epochs, section.lr_net, section.batch_train), rng, aug)
    model.requires_grad_(False)  # only the images get gradients from here on
    images = images.detach().requires_grad_(True)
    loss, feature, discrimination = cafe_loss(model, images, hard_labels, ctx, section, aug, rng)
    (grad,) = torch.autograd.grad(loss, images)
    stats = {"episode": k, "net_epochs": epochs, "feature": float(feature.detach()),
             "discrimination": float(discrimination.detach())}
    return grad, float(loss.detach()), stats


class Cafe(Method):
    """Condensing datasets by aligning features (Wang et al., CVPR 2022)."""

    name = "cafe"
    config_cls = CafeConfig

    def validate(self, section: CafeConfig, cfg: DistillConfig) -> None:
        validate_section(section, cfg)
        validate_common(cfg, self.name)

    def validate_against_data(self, section: CafeConfig, cfg: DistillConfig, num_train: int,
                              num_classes: int) -> None:
        validate_real_batch(section.batch_real, self.name, num_train, num_classes)

    def setup(self, cfg: DistillConfig, resources: WorkerResources) -> MatchingContext:
        return make_context(cfg, resources)

    def gradient(self, context: MatchingContext, learnables: dict[str, Tensor], hard_labels: Tensor, step: int,
                 slot: int, slot_state: dict[str, np.ndarray] | None) -> Gradient:
        grad, loss, stats = cafe_gradient(context, learnables[IMAGES], hard_labels,
                                          task_seed(context.cfg.seed, step, slot))
        return Gradient({IMAGES: grad}, loss, stats)

    def rehearse(self, cfg: DistillConfig, shape: DataShape) -> TaskMemory:
        return rehearse(cfg, shape)

    def describe(self, c: CafeConfig) -> str:
        return (f"cafe embedding={c.embedding_weight} discrimination={c.discrimination_weight} "
                f"lr_net={c.lr_net} batch_real={c.batch_real}")
