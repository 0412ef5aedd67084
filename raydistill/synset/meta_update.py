"""The meta-update: Adam, or SGD with momentum, on the synthetic set's learnable tensors, with adaptive clipping.

One object holds everything a parameter server must own and checkpoint: the learnable tensors by name (images,
learned labels, whatever else a method learns), the optimizer's buffers (Adam's two moments, or SGD's momentum
buffer), the EMA of past gradient norms and the step counter. Its state is a flat dict of tensors and numbers, so it
can be saved without pickle.
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
    clip_norm: float | None  # the threshold used (None on the first step, before any EMA exists, or clip_factor 0)


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # the meta-update's Adam: torch.optim.Adam's defaults


def adam_step_(p: Tensor, g: Tensor, moments: tuple[Tensor, Tensor], t: int, lr: float, grad_scale: float = 1.0,
               row_lr: Tensor | None = None) -> None:
    """Adam in place, as torch.optim.Adam computes it; `moments` is (m, v), updated in place too. On a set of 15M
    values, the out-of-place rule the inner loop needs for autograd costs ~10x more in temporaries, and the
    parameter server runs this every step."""
    m, v = moments
    b1, b2 = ADAM_BETAS
    eps = ADAM_EPS
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


def sgd_step_(p: Tensor, g: Tensor, buf: Tensor, lr: float, momentum: float, grad_scale: float = 1.0,
              row_lr: Tensor | None = None) -> None:
    """SGD with momentum in place, as torch.optim.SGD computes it without dampening or Nesterov: buf = momentum *
    buf + g, then p -= lr * buf. `buf` starts at zero, so the first step's buffer is g, as in torch."""
    if grad_scale != 1.0:
        g = g * grad_scale
    buf.mul_(momentum).add_(g)
    if row_lr is None:
        p.add_(buf, alpha=-lr)
    else:  # a learning-rate multiplier per example (Boost-DD); 0 leaves that example bit-identical
        p.add_(buf * row_lr.view(-1, *([1] * (p.dim() - 1))), alpha=-lr)


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
        if cfg.optimizer not in ("adam", "sgd"):
            raise ValueError(f"MetaOptimizer: unknown optimizer {cfg.optimizer!r}; choose adam or sgd")
        # The optimizer's buffers per tensor, named by their suffix in the state dict: Adam's moments, SGD's momentum.
        self.buffer_names = ("m", "v") if cfg.optimizer == "adam" else ("momentum",)
        self.buffers = {name: tuple(torch.zeros_like(t) for _ in self.buffer_names) for name, t in self.tensors.items()}
        self.grad_norm_ema: float | None = None
        self.updates = 0  # applied updates (Adam's t)
        self.skipped = 0  # non-finite gradients dropped

    def step(self, grads: dict[str, Tensor]) -> UpdateReport:
        """Clip, then one Adam or SGD step; a non-finite gradient is dropped and changes nothing."""
        if set(grads) != set(self.tensors):
            raise ValueError(f"MetaOptimizer.step: gradients for {sorted(grads)}, learnables are {sorted(self.tensors)}")
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in grads.values()))
        if not math.isfinite(norm):
            self.skipped += 1
            return UpdateReport(False, norm, None)

        # No threshold before any EMA exists, nor with clip_factor 0 (clipping off).
        clipping = self.grad_norm_ema is not None and self.cfg.clip_factor > 0
        clip = self.cfg.clip_factor * self.grad_norm_ema if clipping else None
        scale = 1.0 if clip is None or norm <= clip else clip / norm
        # The EMA tracks clipped norms, so one outlier cannot raise the threshold for the steps after it.
        clipped_norm = norm * scale
        d = self.cfg.ema_decay
        self.grad_norm_ema = clipped_norm if self.grad_norm_ema is None else d * self.grad_norm_ema + (1 - d) * clipped_norm

        self.updates += 1
        for name, tensor in self.tensors.items():
            spec = self.specs[name]
            row_lr = self.example_lr_scale if spec.per_example else None
            grad, lr = grads[name].to(tensor.dtype), self.cfg.lr * spec.lr_scale
            if self.cfg.optimizer == "adam":
                adam_step_(tensor, grad, self.buffers[name], self.updates, lr, scale, row_lr)
            else:
                sgd_step_(tensor, grad, *self.buffers[name], lr, self.cfg.momentum, scale, row_lr)
            if spec.clamp_min is not None:
                tensor.clamp_(min=spec.clamp_min)
        return UpdateReport(True, norm, clip)

    def state_dict(self) -> dict:
        state: dict = {"optimizer": self.cfg.optimizer, "updates": self.updates, "skipped": self.skipped,
                       "grad_norm_ema": self.grad_norm_ema}
        for name, tensor in self.tensors.items():
            state[name] = tensor.clone()
            for suffix, buf in zip(self.buffer_names, self.buffers[name]):
                state[f"{name}.{suffix}"] = buf.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("optimizer", "adam")  # states written before SGD existed are Adam's
        if saved != self.cfg.optimizer:
            raise ValueError(f"MetaOptimizer: the state is {saved}'s, this optimizer is {self.cfg.optimizer}; "
                             f"resume with meta.optimizer={saved}")
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self.grad_norm_ema = None if state["grad_norm_ema"] is None else float(state["grad_norm_ema"])
        for name, tensor in self.tensors.items():
            tensor.copy_(state[name])
            self.buffers[name] = tuple(state[f"{name}.{suffix}"].clone() for suffix in self.buffer_names)
