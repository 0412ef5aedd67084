"""The meta-update: Adam on the synthetic set's learnable tensors, with adaptive gradient clipping.

One object holds everything a parameter server must own and checkpoint: the learnable tensors by name (images,
learned labels, whatever else a method learns), their Adam moments, the EMA of past gradient norms and the step
counter. Its state is a flat dict of tensors and numbers, so it can be saved without pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from raydistill.config import MetaOptConfig
from raydistill.methods.base import Learnable


@dataclass
class UpdateReport:
    applied: bool  # False: the gradient was not finite and the set is unchanged
    grad_norm: float  # before clipping
    clip_norm: float | None  # the threshold used (None on the first step, before any EMA exists)


def adam_step_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, t: int, lr: float, grad_scale: float = 1.0,
               row_lr: Tensor | None = None, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
    """Adam in place, as torch.optim.Adam computes it; on a set of 15M values, the out-of-place rule the inner loop
    needs for autograd costs ~10x more in temporaries, and the parameter server runs this every step."""
    b1, b2 = betas
    if grad_scale != 1.0:
        g = g * grad_scale
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.sqrt().div_(math.sqrt(1 - b2**t)).add_(eps)
    if row_lr is None:
        p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
    else:  # a learning-rate multiplier per example (Boost-DD); 0 leaves that example bit-identical
        step = (m / denom).mul_(row_lr.view(-1, *([1] * (p.dim() - 1))))
        p.add_(step, alpha=-lr / (1 - b1**t))


class MetaOptimizer:
    """Owns the learnable tensors of the synthetic set and applies averaged meta-gradients to them."""

    def __init__(self, tensors: dict[str, Tensor], specs: dict[str, Learnable], cfg: MetaOptConfig,
                 example_lr_scale: Tensor | None = None):
        """`example_lr_scale` (n,) multiplies the meta lr of each synthetic example in every per-example tensor
        (Boost-DD); None: all 1."""
        if set(tensors) != set(specs):
            raise ValueError(f"MetaOptimizer: tensors {sorted(tensors)} do not match learnables {sorted(specs)}")
        self.cfg, self.specs = cfg, dict(specs)
        self.tensors = {name: t.detach().clone() for name, t in tensors.items()}
        like = next(iter(self.tensors.values()))
        self.example_lr_scale = None if example_lr_scale is None else example_lr_scale.to(like.device, like.dtype)
        self.moments = {name: (torch.zeros_like(t), torch.zeros_like(t)) for name, t in self.tensors.items()}
        self.grad_norm_ema: float | None = None
        self.updates = 0  # applied updates (Adam's t)
        self.skipped = 0  # non-finite gradients dropped

    def step(self, grads: dict[str, Tensor]) -> UpdateReport:
        """Clip, then one Adam step; a non-finite gradient is dropped and changes nothing."""
        if set(grads) != set(self.tensors):
            raise ValueError(f"MetaOptimizer.step: gradients for {sorted(grads)}, learnables are {sorted(self.tensors)}")
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in grads.values()))
        if not math.isfinite(norm):
            self.skipped += 1
            return UpdateReport(False, norm, None)

        clip = None if self.grad_norm_ema is None else self.cfg.clip_factor * self.grad_norm_ema
        scale = 1.0 if clip is None or norm <= clip else clip / norm
        # The EMA tracks clipped norms, so one outlier cannot raise the threshold for the steps after it.
        clipped_norm = norm * scale
        d = self.cfg.ema_decay
        self.grad_norm_ema = clipped_norm if self.grad_norm_ema is None else d * self.grad_norm_ema + (1 - d) * clipped_norm

        self.updates += 1
        for name, tensor in self.tensors.items():
            spec = self.specs[name]
            row_lr = self.example_lr_scale if spec.per_example else None
            adam_step_(tensor, grads[name].to(tensor.dtype), *self.moments[name], self.updates,
                       self.cfg.lr * spec.lr_scale, scale, row_lr)
            if spec.clamp_min is not None:
                tensor.clamp_(min=spec.clamp_min)
        return UpdateReport(True, norm, clip)

    def state_dict(self) -> dict:
        state: dict = {"updates": self.updates, "skipped": self.skipped, "grad_norm_ema": self.grad_norm_ema}
        for name, tensor in self.tensors.items():
            m, v = self.moments[name]
            state[name], state[f"{name}.m"], state[f"{name}.v"] = tensor.clone(), m.clone(), v.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.grad_norm_ema = None if state["grad_norm_ema"] is None else float(state["grad_norm_ema"])
        for name, tensor in self.tensors.items():
            tensor.copy_(state[name])
            self.moments[name] = (state[f"{name}.m"].clone(), state[f"{name}.v"].clone())
