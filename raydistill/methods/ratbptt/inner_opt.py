"""Functional optimizers for the unrolled inner loop (and the Adam rule the meta-update reuses).

Parameters are lists of tensors; a step returns new tensors instead of mutating, so the window steps stay in the
autograd graph and the meta-gradient can flow back through them. With `differentiable=False` (the prefix) the same
rule runs under no_grad on detached tensors: no graph, no memory growth with the prefix length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def safe_sqrt(v: Tensor) -> Tensor:
    """sqrt(v) with a finite derivative at v = 0.

    d sqrt(v)/dv is infinite at 0, and a zero inner-gradient element makes Adam's second moment exactly 0; the
    chain rule then multiplies inf by 0 and the meta-gradient turns NaN. The double-where keeps the forward value
    exact and routes no gradient through elements where v == 0.
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def adam_update(
    p: Tensor, g: Tensor, moments: tuple[Tensor, Tensor], t: int, lr: float | Tensor, betas=(0.9, 0.999),
    eps: float = 1e-8
) -> tuple[Tensor, Tensor, Tensor]:
    """One Adam step, written as torch.optim.Adam computes it (same operation order, same bias corrections);
    `moments` is (m, v); returns the new (p, m, v)."""
    b1, b2 = betas
    return adam_with_corrections(p, g, moments, lr / (1 - b1**t), math.sqrt(1 - b2**t), betas, eps)


def adam_with_corrections(p: Tensor, g: Tensor, moments: tuple[Tensor, Tensor], step_size: float | Tensor,
                          bias_correction2_sqrt: float | Tensor, betas=(0.9, 0.999), eps: float = 1e-8
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's update given its bias corrections (lr / (1 - b1^t) and sqrt(1 - b2^t)): scalars, or tensors that
    broadcast against p when stacked networks are at different steps (several samples per task)."""
    m, v = moments
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = safe_sqrt(v) / bias_correction2_sqrt + eps
    return p - step_size * m / denom, m, v


@dataclass
class InnerState:
    step: int = 0
    buffers: list[list[Tensor]] = field(default_factory=list)  # Adam: [m, v]; SGD: [momentum]

    def detached(self) -> "InnerState":
        return InnerState(self.step, [[b.detach() for b in group] for group in self.buffers])


class InnerAdam:
    """Adam (default betas, eps 1e-8, no weight decay)."""

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps

    def init(self, params: list[Tensor]) -> InnerState:
        return InnerState(0, [[torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]])

    def step(self, params: list[Tensor], grads: list[Tensor], state: InnerState) -> tuple[list[Tensor], InnerState]:
        t = state.step + 1
        out, ms, vs = [], [], []
        for p, g, m, v in zip(params, grads, *state.buffers):
            p, m, v = adam_update(p, g, (m, v), t, self.lr, self.betas, self.eps)
            out.append(p), ms.append(m), vs.append(v)
        return out, InnerState(t, [ms, vs])


class InnerSGD:
    """SGD with heavy-ball momentum, as torch.optim.SGD (no dampening, no Nesterov)."""

    def __init__(self, lr: float, momentum: float = 0.9):
        self.lr, self.momentum = lr, momentum

    def init(self, params: list[Tensor]) -> InnerState:
        return InnerState(0, [[torch.zeros_like(p) for p in params]])

    def step(self, params: list[Tensor], grads: list[Tensor], state: InnerState) -> tuple[list[Tensor], InnerState]:
        bufs = [self.momentum * b + g for b, g in zip(state.buffers[0], grads)]
        return [p - self.lr * b for p, b in zip(params, bufs)], InnerState(state.step + 1, [bufs])


def make_inner_optimizer(name: str, lr: float, momentum: float = 0.9) -> InnerAdam | InnerSGD:
    if name == "adam":
        return InnerAdam(lr)
    if name == "sgd":
        return InnerSGD(lr, momentum)
    raise ValueError(f"unknown inner optimizer {name!r}")
