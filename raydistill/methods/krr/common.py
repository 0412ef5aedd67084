"""What FRePo, RFAD and KIP share: one task = kernels from the method, the closed form, the loss, its gradient.

A task draws `batch_real` real training images (the target batch) uniformly from the training split, asks the
method for the support kernel K_ss (the synthetic set's, with a graph into the images) and the target kernel K_ts
(the real batch against the synthetic set), predicts the target labels with krr_predict, and returns the gradient
of the loss with respect to every learnable: the images, the learned labels when labels are learned, and RFAD's
Platt temperature with the platt loss. The support targets are the centred one-hot labels (solver.centred_targets),
or the learned labels centred the same way; learned labels stay >= 0 as the engine keeps every method's learned
labels (they start one-hot), so a centred target never falls below its one-hot off-value.

Every random choice (the target batch, the networks) comes from one CPU generator seeded by (run seed, step, slot),
so a task is a pure function of the snapshot, the step and the slot, and a retried task computes the same gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raydistill.config.errors import ConfigError
from raydistill.config.schema import DistillConfig
from raydistill.methods.base import (
    IMAGES,
    SOFT_LABELS,
    Gradient,
    Learnable,
    Method,
    ModelFactory,
    WorkerResources,
    task_seed,
)
from raydistill.methods.krr.config import KrrConfig
from raydistill.methods.krr.solver import centred_targets, krr_predict, mse_loss, platt_loss

PLATT = "platt_log_temperature"  # RFAD's learned log temperature (the platt loss), a learnable of its own
FEATURE_CHUNK = 512  # real images per no-graph forward when featurising a target batch


@dataclass
class KrrContext:
    """A worker's set-up: the config, the real training split, the class count and the model factory."""

    cfg: DistillConfig
    real_x: Any  # a Tensor or a RealImages (normalised as read)
    real_y: Tensor
    num_classes: int
    model_factory: ModelFactory


def target_batch(ctx: KrrContext, n: int, rng: torch.Generator, like: Tensor) -> tuple[Tensor, Tensor]:
    """n real training images drawn uniformly without replacement (all of them when the split is smaller), in
    `like`'s dtype and device, and their labels."""
    pick = torch.randperm(len(ctx.real_y), generator=rng)[:n]
    x = ctx.real_x[pick.to(ctx.real_y.device)]
    return x.to(device=like.device, dtype=like.dtype), ctx.real_y[pick.to(ctx.real_y.device)].to(like.device)


def in_chunks(fn, x: Tensor, chunk: int = FEATURE_CHUNK) -> Tensor:
    """fn over x in row chunks, concatenated (for no-graph forwards of large target batches)."""
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def feature_kernels(featurise, images: Tensor, real: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, int]:
    """(F_s F_s^T, F_t F_s^T, features) in `dtype`: the support's features with a graph into `images`, the target
    batch's without one, in chunks."""
    with torch.no_grad():
        f_t = in_chunks(featurise, real).to(dtype)
    f_s = featurise(images).to(dtype)
    return f_s @ f_s.T, f_t @ f_s.T, int(f_s.shape[1])


def solve_dtype(section: KrrConfig, like: Tensor) -> torch.dtype:
    return torch.float64 if section.float64 else like.dtype


def derived_seed(*parts: int) -> int:
    """A seed from integer parts (run seed, a tag, ...), independent of task_seed's for any (step, slot)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class KrrMethod(Method):
    """Base class of the kernel ridge regression methods: subclasses set name, config_cls and `check`, and
    implement `kernels`."""

    def check(self, section: Any, cfg: DistillConfig) -> None:
        raise NotImplementedError

    def kernels(self, ctx: KrrContext, images: Tensor, labels: Tensor, real: Tensor, step: int,
                rng: torch.Generator) -> tuple[Tensor, Tensor, dict]:
        """(K_ss with a graph into `images`, K_ts, statistics) for one task; `labels` are the support's label rows
        (one-hot, or the learned labels)."""
        raise NotImplementedError

    def validate(self, section: KrrConfig, cfg: DistillConfig) -> None:
        self.check(section, cfg)

    def validate_against_data(self, section: KrrConfig, cfg: DistillConfig, num_train: int,
                              num_classes: int) -> None:
        if section.batch_real > num_train:
            raise ConfigError(f"{self.name}.batch_real: {section.batch_real} real images per task, but the training "
                              f"split has {num_train}; set {self.name}.batch_real <= {num_train}")

    def learnables(self, cfg: DistillConfig) -> dict[str, Learnable]:
        out = super().learnables(cfg)
        section: KrrConfig = cfg.method_config
        if section is not None and section.loss == "platt":
            out[PLATT] = Learnable(lr_scale=section.platt_lr_scale, per_example=False)
        return out

    def init_extra(self, cfg: DistillConfig, num_classes: int) -> dict[str, Tensor]:
        section: KrrConfig = cfg.method_config
        return {PLATT: torch.zeros(1)} if section.loss == "platt" else {}  # exp(0) = 1, RFAD's start

    def setup(self, cfg: DistillConfig, resources: WorkerResources) -> KrrContext:
        return KrrContext(cfg, resources.train_x, resources.train_y, resources.num_classes, resources.model_factory)

    def gradient(self, context: KrrContext, learnables: dict[str, Tensor], hard_labels: Tensor, step: int,
                 slot: int, slot_state: dict[str, np.ndarray] | None) -> Gradient:
        loss, stats, inputs = self.task_loss(context, learnables, hard_labels, step, slot)
        grads = torch.autograd.grad(loss, list(inputs.values()))
        return Gradient(dict(zip(inputs, grads)), float(loss.detach()), stats)

    def task_loss(self, ctx: KrrContext, learnables: dict[str, Tensor], hard_labels: Tensor, step: int,
                  slot: int) -> tuple[Tensor, dict, dict[str, Tensor]]:
        """(the task's loss with a graph into its inputs, statistics, the inputs by learnable name)."""
        section: KrrConfig = ctx.cfg.method_config
        rng = torch.Generator().manual_seed(task_seed(ctx.cfg.seed, step, slot))
        inputs = {name: value.detach().requires_grad_(True) for name, value in learnables.items()}
        images = inputs[IMAGES]
        real_x, real_y = target_batch(ctx, section.batch_real, rng, images)
        labels = inputs.get(SOFT_LABELS)
        if labels is None:
            labels = F.one_hot(hard_labels, ctx.num_classes).to(images.dtype)
        start = time.perf_counter()
        k_ss, k_ts, stats = self.kernels(ctx, images, labels, real_x, step, rng)
        kernel_s = time.perf_counter() - start
        support = centred_targets(labels, ctx.num_classes)
        pred = krr_predict(k_ss, k_ts.to(k_ss.dtype), support.to(k_ss.dtype), section.reg, section.float64)
        if section.loss == "platt":
            loss = platt_loss(pred, real_y, inputs[PLATT].to(pred.dtype).reshape(()))
        else:
            target = centred_targets(F.one_hot(real_y, ctx.num_classes).to(pred.dtype), ctx.num_classes)
            loss = mse_loss(pred, target)
        stats = {**stats, "target_accuracy": float((pred.argmax(1) == real_y).float().mean()),
                 "kernel_seconds": round(kernel_s, 4)}
        return loss.to(images.dtype), stats, inputs
