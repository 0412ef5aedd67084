"""Several RaT-BPTT samples in one gradient task (`ratbptt.samples_per_task` > 1), run as one batched computation.

Sample k is exactly the sample `meta_gradient` draws with seed `sample_seed(seed, k)`: its own network, window
start, minibatches, augmentations and real batch, drawn from its own generator in the same order. The K networks'
parameters are stacked along a new first dimension and every network evaluation runs once for all of them through
`torch.func.vmap` (convolutions become grouped convolutions), with `torch.func.grad` for the inner gradients; the
outer autograd graph runs through it for the meta-gradient. The task returns the mean over its samples, so a
server averaging tasks of K samples each averages per sample.

Different window starts: each sample runs `start` prefix steps and then the (common) window length W. The prefix
runs in lockstep over the samples that still have prefix steps left (the one with the latest start alone at the
end), so no step is computed twice or wasted; the windows then run in lockstep for all K, each network at its own
step count (Adam's bias corrections are per sample). `tests/unit/test_samples_per_task.py` checks the result against
the mean of K separate `meta_gradient` calls in float64.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from raydistill.config.schema import AugmentConfig
from raydistill.methods.base import ModelFactory
from raydistill.methods.ratbptt.config import RatBpttConfig
from raydistill.methods.ratbptt.inner_opt import InnerAdam, InnerState, adam_with_corrections
from raydistill.methods.ratbptt.meta_gradient import MetaGradient, RealBatch, SynSet, Unroll, as_leaves
from raydistill.models.losses import soft_cross_entropy


def sample_seed(seed: int, k: int) -> int:
    """The seed of sample k of the task with `seed`."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Stack:
    """K networks' parameters and inner-optimizer buffers, stacked, with each network's step count."""

    def __init__(self, unrolls: list[Unroll]):
        self.unrolls = unrolls
        self.model, self.names, self.opt = unrolls[0].model, unrolls[0].names, unrolls[0].opt
        per_net = [[p.detach() for p in u.model.parameters()] for u in unrolls]
        self.params = [torch.stack(ps) for ps in zip(*per_net)]
        self.state = self.opt.init(self.params)
        self.steps = [0] * len(unrolls)

    def loss(self, params: dict[str, Tensor], x: Tensor, targets: Tensor) -> Tensor:
        """One network's inner loss (vmapped over the stack)."""
        return soft_cross_entropy(functional_call(self.model, params, (x,)), targets)

    def real_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(self.model, params, (x,)), y)

    def step(self, params: list[Tensor], buffers: list[list[Tensor]], members: list[int], images: Tensor,
             targets: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        """One inner step of the networks `members` (their rows of params / buffers): each draws its own batch."""
        batches = [self.unrolls[k].inner_batch(images, targets) for k in members]
        x = torch.stack([b[0] for b in batches])
        y = torch.stack([b[1] for b in batches])
        grads = vmap(grad(self.loss))(dict(zip(self.names, params)), x, y)
        grads = [grads[n] for n in self.names]
        for k in members:
            self.steps[k] += 1
        if not isinstance(self.opt, InnerAdam):
            new, state = self.opt.step(params, grads, InnerState(0, buffers))
            return new, state.buffers
        # Adam's bias corrections per network (its own step count), as adam_update computes them in float64
        b1, b2 = self.opt.betas
        t = [self.steps[k] for k in members]
        like = dict(dtype=params[0].dtype, device=params[0].device)
        step_size = torch.tensor([self.opt.lr / (1 - b1**s) for s in t], **like)
        correction2 = torch.tensor([math.sqrt(1 - b2**s) for s in t], **like)
        out, ms, vs = [], [], []
        for p, g, m, v in zip(params, grads, *buffers):
            per_net = (len(members),) + (1,) * (p.dim() - 1)  # broadcasts over one network's parameter
            p, m, v = adam_with_corrections(p, g, (m, v), step_size.view(per_net), correction2.view(per_net),
                                            self.opt.betas, self.opt.eps)
            out.append(p), ms.append(m), vs.append(v)
        return out, [ms, vs]

    def prefix(self, images: Tensor, targets: Tensor) -> None:
        """Every network's prefix, graph-free, in lockstep over the networks with prefix steps left."""
        starts = [u.start for u in self.unrolls]
        images, targets = images.detach(), targets.detach()
        with torch.no_grad():
            for i in range(max(starts)):
                members = [k for k, s in enumerate(starts) if s > i]
                if len(members) == len(starts):
                    self.params, self.state.buffers = self.step(self.params, self.state.buffers, members, images,
                                                                targets)
                    continue
                rows = torch.tensor(members, device=images.device)
                params = [p.index_select(0, rows) for p in self.params]
                buffers = [[b.index_select(0, rows) for b in group] for group in self.state.buffers]
                params, buffers = self.step(params, buffers, members, images, targets)
                for whole, part in zip(self.params, params):
                    whole.index_copy_(0, rows, part)
                for group, parts in zip(self.state.buffers, buffers):
                    for whole, part in zip(group, parts):
                        whole.index_copy_(0, rows, part)

    def window(self, images: Tensor, targets: Tensor) -> None:
        """The common window length, differentiable, all networks together."""
        everyone = list(range(len(self.unrolls)))
        self.params = [p.detach().requires_grad_(True) for p in self.params]
        self.state = self.state.detached()
        for _ in range(self.unrolls[0].window):
            self.params, self.state.buffers = self.step(self.params, self.state.buffers, everyone, images, targets)

    def meta_loss(self, real: RealBatch) -> Tensor:
        """The mean over the networks of each one's meta-loss on its own real batch."""
        batches = [u.real_batch(real) for u in self.unrolls]
        x = torch.stack([b[0] for b in batches])
        y = torch.stack([b[1] for b in batches])
        return vmap(self.real_loss)(dict(zip(self.names, self.params)), x, y).mean()


def batched_meta_gradient(
    syn: SynSet,
    real: RealBatch,
    model_factory: ModelFactory,
    cfg: RatBpttConfig,
    aug: AugmentConfig,
    seed: int,
) -> MetaGradient:
    """The mean of `cfg.samples_per_task` RaT-BPTT samples (seeds `sample_seed(seed, k)`); `start` is the samples'
    mean window start, and `starts` (in `MetaGradient.starts`) each one."""
    began = time.perf_counter()
    syn, leaves = as_leaves(syn)
    unrolls = [Unroll(syn, model_factory, cfg, aug, sample_seed(seed, k)) for k in range(cfg.samples_per_task)]
    if len({u.window for u in unrolls}) != 1:
        raise ValueError("samples_per_task needs windows of one length (not window_mode random_length)")
    stack = Stack(unrolls)
    stack.prefix(syn.images, syn.targets)
    stack.window(syn.images, syn.targets)
    loss = stack.meta_loss(real)
    grads = torch.autograd.grad(loss, leaves)
    starts = [u.start for u in unrolls]
    return MetaGradient(images=grads[0], labels=grads[1] if syn.soft_labels is not None else None,
                        meta_loss=float(loss.detach()), start=round(sum(starts) / len(starts)),
                        window=unrolls[0].window, seconds=time.perf_counter() - began, starts=starts)
