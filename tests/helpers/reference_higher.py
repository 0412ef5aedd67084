"""The reference: one RaT-BPTT meta-gradient the way the official implementation computes it.

The official code (Feng, Vedantam & Kempe, ICLR 2024) trains a fresh network with `torch.optim.Adam` for the steps
before the window, calling `loss.backward()` on a loss built from the synthetic images themselves (an `nn.Embedding`
weight), so every prefix step also back-propagates into the synthetic set; the gradient that accumulates there is
discarded (zeroed) before the meta-loss is back-propagated. The window runs under `higher.innerloop_ctx` with
`copy_initial_weights=True`: a functional copy of the network and a differentiable Adam (`diffopt.step(loss)`). The
meta-loss is the cross-entropy of the unrolled network on a real batch, back-propagated into the synthetic images.

This module reproduces that computation with `higher` (the `bench` extra) on a plain PyTorch network: every instance
norm is `nn.GroupNorm(c, c)`, in the default (NCHW) layout. It draws its randomness exactly as
`raydistill.methods.ratbptt.meta_gradient` does (window, network init, synthetic minibatches, augmentation, real
batch, all from one generator seeded by the caller), so the two compute the same function of the same inputs:
`tests/unit/test_reference_gradient.py` checks it in float64, and the step benchmark (bench_step.py) times it. One
deliberate difference from `higher` 0.2.1: its DifferentiableAdam adds eps before the bias correction of the second
moment (the pre-1.0 `torch.optim.Adam` formula), while the official prefix, `torch.optim.Adam` and raydistill add it
after; `TorchAdam` below is higher's differentiable Adam with today's formula, so the window follows the same rule as
the prefix. It does the same operations, so it costs the same.
"""

from __future__ import annotations

import math

import higher
import higher.optim
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from raydistill.config.schema import AugmentConfig
from raydistill.data.augment import augment
from raydistill.methods.base import ModelFactory, seeded_network
from raydistill.methods.ratbptt.config import RatBpttConfig
from raydistill.data.selection import class_index
from raydistill.methods.ratbptt.meta_gradient import plan_window, sample_synthetic_batch
from raydistill.models.losses import soft_cross_entropy


class TorchAdam(higher.optim.DifferentiableOptimizer):
    """higher's differentiable Adam (same state, same zero-moment gradient mask) with torch.optim.Adam's update:
    p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""

    def _update(self, grouped_grads, **kwargs) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            beta1, beta2 = group["betas"]
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                state["step"] = step = int(state["step"]) + 1
                state["exp_avg"] = m = state["exp_avg"] * beta1 + (1 - beta1) * g
                state["exp_avg_sq"] = v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
                higher.optim._maybe_mask(v, v == 0.0)  # higher's guard: no gradient through sqrt(v) where v == 0
                denom = v.sqrt() / math.sqrt(1 - beta2**step) + group["eps"]
                group["params"][p_idx] = p - (group["lr"] / (1 - beta1**step)) * m / denom


def official_network(model: nn.Module, norms: bool = True, pools: bool = True) -> nn.Module:
    """`model` with every GroupNorm (raydistill's InstanceNorm included) replaced by a plain `nn.GroupNorm` holding
    the same parameters, every average pool (raydistill's AvgPool2x2 included) by a plain `nn.AvgPool2d`, and
    raydistill's Conv2d by a plain `nn.Conv2d` (always): the network the official code trains. `norms` / `pools` False leave that kind of layer as it is (bench_step.py's
    one-lever variants)."""
    for name, child in model.named_children():
        if norms and isinstance(child, nn.GroupNorm) and type(child) is not nn.GroupNorm:
            plain = nn.GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            plain.load_state_dict(child.state_dict())
            setattr(model, name, plain.to(child.weight.device, child.weight.dtype))
        elif isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:  # raydistill's Conv2d
            plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                              child.dilation, child.groups, child.bias is not None, child.padding_mode)
            plain.load_state_dict(child.state_dict())
            setattr(model, name, plain.to(child.weight.device, child.weight.dtype))
        elif pools and isinstance(child, nn.AvgPool2d) and type(child) is not nn.AvgPool2d:
            setattr(model, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode,
                                              child.count_include_pad, child.divisor_override))
        else:
            official_network(child, norms, pools)
    return model


def reference_meta_gradient(
    images: Tensor,
    hard_labels: Tensor,
    soft_labels: Tensor | None,
    real_x: Tensor,
    real_y: Tensor,
    model_factory: ModelFactory,
    cfg: RatBpttConfig,
    aug: AugmentConfig,
    seed: int,
) -> tuple[Tensor, Tensor | None, float]:
    """(d meta-loss / d images, d meta-loss / d soft labels or None, meta-loss), computed the official way."""
    if cfg.inner_optimizer != "adam":
        raise ValueError("the higher reference implements the inner Adam only")
    rng = torch.Generator().manual_seed(seed)
    start, window = plan_window(cfg, rng)
    num_classes = int(hard_labels.max()) + 1 if soft_labels is None else soft_labels.shape[1]
    by_class = class_index(hard_labels.cpu(), num_classes)
    net = official_network(seeded_network(model_factory, rng, images))

    # The learnables, as the official Distill module holds them: leaves that every backward reaches.
    data = images.detach().clone().requires_grad_(True)
    labels = None if soft_labels is None else soft_labels.detach().clone().requires_grad_(True)
    targets = hard_labels if labels is None else labels

    def batch() -> tuple[Tensor, Tensor]:
        idx = sample_synthetic_batch(by_class, cfg, rng)
        x, t = (data, targets) if idx is None else (data[idx.to(data.device)], targets[idx.to(data.device)])
        return augment(x, rng, aug), t

    opt = torch.optim.Adam(net.parameters(), lr=cfg.inner_lr)
    for _ in range(start):  # the prefix: plain training steps whose backward also reaches the synthetic set
        opt.zero_grad()
        x, t = batch()
        soft_cross_entropy(net(x), t).backward()
        opt.step()
    data.grad = None  # the official outer optimizer's zero_grad(): the prefix's gradient is discarded
    if labels is not None:
        labels.grad = None

    fnet = higher.monkeypatch(net, copy_initial_weights=True)  # what higher.innerloop_ctx(net, opt) builds
    diffopt = TorchAdam(opt, net.parameters(), fmodel=fnet, track_higher_grads=True)
    for _ in range(window):
        x, t = batch()
        diffopt.step(soft_cross_entropy(fnet(x), t))
    pick = torch.randperm(real_x.shape[0], generator=rng)[: cfg.real_batch].to(real_x.device)
    x_real = augment(real_x[pick], rng, aug).to(images.dtype)
    loss = F.cross_entropy(fnet(x_real), real_y[pick])
    loss.backward()
    return data.grad, None if labels is None else labels.grad, float(loss.detach())
