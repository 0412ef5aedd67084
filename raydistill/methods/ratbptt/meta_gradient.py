"""One RaT-BPTT meta-gradient sample, in plain PyTorch (no Ray).

A sample: a fresh network; a window [start, start + window) drawn from the unroll T; `start` inner steps on the
synthetic set with no graph (the prefix); `window` differentiable inner steps; the cross-entropy of the unrolled
network on an augmented real batch (the meta-loss); its gradient with respect to the synthetic images (and the
learned labels). Every random choice comes from one generator seeded by the caller, so the same seed gives the same
sample: a retried task recomputes the same gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from raydistill.data.augment import augment
from raydistill.config.schema import AugmentConfig
from raydistill.methods.base import ModelFactory, seeded_network
from raydistill.methods.ratbptt.config import RatBpttConfig
from raydistill.methods.ratbptt.inner_opt import make_inner_optimizer
from raydistill.models.layers import set_conv_channels_last
from raydistill.models.losses import soft_cross_entropy



@dataclass
class MetaGradient:
    images: Tensor  # d meta-loss / d synthetic images
    labels: Tensor | None  # d meta-loss / d soft labels (None when labels are fixed)
    meta_loss: float
    start: int  # window start s
    window: int  # window length W
    seconds: float


def plan_window(cfg: RatBpttConfig, rng: torch.Generator) -> tuple[int, int]:
    """(start, window) for the configured window mode; the unroll ends at start + window."""
    T, W = cfg.unroll, cfg.window
    mode = cfg.window_mode
    if mode == "random":  # RaT-BPTT
        return int(torch.randint(0, T - W + 1, (1,), generator=rng)), W
    if mode == "end":  # truncated BPTT
        return T - W, W
    if mode == "fixed":
        return cfg.fixed_start, W
    if mode == "full":  # BPTT
        return 0, T
    if mode == "random_length":
        return 0, int(torch.randint(W, T + 1, (1,), generator=rng))
    raise ValueError(f"unknown window mode {mode!r}")


def class_indices(hard_labels: Tensor, num_classes: int) -> list[Tensor]:
    return [torch.nonzero(hard_labels.cpu() == c).flatten() for c in range(num_classes)]


def sample_synthetic_batch(
    by_class: list[Tensor], cfg: RatBpttConfig, rng: torch.Generator
) -> Tensor | None:
    """Indices of one inner minibatch: batch_per_class images from each of classes_per_step classes.

    None means the whole synthetic set (the default), which skips an indexing copy per step.
    """
    if cfg.classes_per_step is None and cfg.batch_per_class is None:
        return None
    num_classes = len(by_class)
    classes = range(num_classes)
    if cfg.classes_per_step is not None and cfg.classes_per_step < num_classes:
        classes = torch.randperm(num_classes, generator=rng)[: cfg.classes_per_step].tolist()
    picks = []
    for c in classes:
        idx = by_class[c]
        if cfg.batch_per_class is not None and cfg.batch_per_class < len(idx):
            idx = idx[torch.randperm(len(idx), generator=rng)[: cfg.batch_per_class]]
        picks.append(idx)
    return torch.cat(picks)


def unrolled_meta_loss(
    images: Tensor,
    hard_labels: Tensor,
    soft_labels: Tensor | None,
    real_x: Tensor,
    real_y: Tensor,
    model_factory: ModelFactory,
    cfg: RatBpttConfig,
    aug: AugmentConfig,
    seed: int,
    prefix_images: Tensor | None = None,
    prefix_soft_labels: Tensor | None = None,
) -> tuple[Tensor, int, int]:
    """The meta-loss after an unroll whose first `start` steps use `prefix_*` (default: the detached inputs).

    The truncated RaT-BPTT gradient is exactly the derivative of this function with respect to `images` and
    `soft_labels` when the prefix inputs are held fixed, which is what the finite-difference tests check.
    Returns (meta_loss, start, window).
    """
    rng = torch.Generator().manual_seed(seed)
    start, window = plan_window(cfg, rng)
    num_classes = int(hard_labels.max()) + 1 if soft_labels is None else soft_labels.shape[1]
    by_class = class_indices(hard_labels, num_classes)
    model = seeded_network(model_factory, rng, images)
    set_conv_channels_last(model, cfg.channels_last)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    opt = make_inner_optimizer(cfg.inner_optimizer, cfg.inner_lr, cfg.inner_momentum)
    state = opt.init(params)

    def inner_loss(params: list[Tensor], x: Tensor, targets: Tensor) -> Tensor:
        idx = sample_synthetic_batch(by_class, cfg, rng)
        if idx is not None:
            idx = idx.to(x.device)
            x, targets = x[idx], targets[idx]
        x = augment(x, rng, aug)
        return soft_cross_entropy(functional_call(model, dict(zip(names, params)), (x,)), targets)

    # Prefix: ordinary training steps. Gradients go to the network only, never into the synthetic set.
    x_prefix = (images if prefix_images is None else prefix_images).detach()
    soft_prefix = soft_labels if prefix_soft_labels is None else prefix_soft_labels
    t_prefix = hard_labels if soft_prefix is None else soft_prefix.detach()
    for _ in range(start):
        params = [p.requires_grad_(True) for p in params]
        grads = torch.autograd.grad(inner_loss(params, x_prefix, t_prefix), params)
        with torch.no_grad():
            params, state = opt.step(params, list(grads), state)

    # Window: differentiable steps; the optimizer moments carry over from the prefix as constants.
    params = [p.detach().requires_grad_(True) for p in params]
    state = state.detached()
    targets = hard_labels if soft_labels is None else soft_labels
    for _ in range(window):
        grads = torch.autograd.grad(inner_loss(params, images, targets), params, create_graph=True)
        params, state = opt.step(params, list(grads), state)

    pick = torch.randperm(real_x.shape[0], generator=rng)[: cfg.real_batch].to(real_x.device)
    x_real = augment(real_x[pick], rng, aug)
    logits = functional_call(model, dict(zip(names, params)), (x_real.to(images.dtype),))
    return F.cross_entropy(logits, real_y[pick]), start, window


def meta_gradient(
    images: Tensor,
    hard_labels: Tensor,
    soft_labels: Tensor | None,
    real_x: Tensor,
    real_y: Tensor,
    model_factory: ModelFactory,
    cfg: RatBpttConfig,
    aug: AugmentConfig,
    seed: int,
) -> MetaGradient:
    """One RaT-BPTT meta-gradient sample for the synthetic set (images, labels); inputs are not modified."""
    began = time.perf_counter()
    images = images.detach().requires_grad_(True)
    leaves = [images]
    if soft_labels is not None:
        soft_labels = soft_labels.detach().requires_grad_(True)
        leaves.append(soft_labels)
    loss, start, window = unrolled_meta_loss(
        images, hard_labels, soft_labels, real_x, real_y, model_factory, cfg, aug, seed
    )
    grads = torch.autograd.grad(loss, leaves)
    return MetaGradient(
        images=grads[0],
        labels=grads[1] if soft_labels is not None else None,
        meta_loss=float(loss.detach()),
        start=start,
        window=window,
        seconds=time.perf_counter() - began,
    )
