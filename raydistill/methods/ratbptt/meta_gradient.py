"""One RaT-BPTT meta-gradient sample, in plain PyTorch (no Ray).

A sample: a fresh network; a window [start, start + window) drawn from the unroll T; `start` inner steps on the
synthetic set with no graph (the prefix); `window` differentiable inner steps; the cross-entropy of the unrolled
network on an augmented real batch (the meta-loss); its gradient with respect to the synthetic images (and the
learned labels). Every random choice comes from one generator seeded by the caller, so the same seed gives the same
sample: a retried task recomputes the same gradient.

Two options change how the window is differentiated: `window_segments` > 1 recomputes the window's graph segment by
segment during the backward pass (checkpointed.py: the same gradient in less memory), and `precision: bf16` runs
the window's and the meta-loss's forward passes under bfloat16 autocast (different numerics; float32 losses,
gradients in the images' dtype). `compile_prefix` runs the prefix's steps through torch.compile (compiled.py).

`real_batch_chunks` > 1 runs the meta-loss's real batch in chunks: the gradient reaches the synthetic set through
the window's final parameters only, so each chunk's share of the meta-loss is differentiated with respect to a
detached copy of them (its graph freed before the next chunk), and the sum goes back through the window once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from raydistill.config.schema import AugmentConfig
from raydistill.data.augment import augment
from raydistill.data.selection import class_index
from raydistill.methods.base import ModelFactory, seeded_network
from raydistill.methods.ratbptt.checkpointed import checkpointed_window_gradient, segment_lengths
from raydistill.methods.ratbptt.compiled import compiled_loss
from raydistill.methods.ratbptt.config import RatBpttConfig
from raydistill.methods.ratbptt.inner_opt import InnerState, make_inner_optimizer
from raydistill.models.layers import set_conv_channels_last
from raydistill.models.losses import soft_cross_entropy


@dataclass(frozen=True)
class SynSet:
    """The synthetic set a meta-gradient is taken for: images, their hard labels, and the learned soft labels
    (None when the labels are fixed)."""

    images: Tensor
    hard_labels: Tensor
    soft_labels: Tensor | None = None

    @property
    def targets(self) -> Tensor:
        """What the inner steps train on: the soft labels when learned, else the hard labels."""
        return self.hard_labels if self.soft_labels is None else self.soft_labels


@dataclass(frozen=True)
class RealBatch:
    """The real images and labels the meta-loss draws its batch from."""

    x: Tensor
    y: Tensor


@dataclass
class MetaGradient:
    images: Tensor  # d meta-loss / d synthetic images
    labels: Tensor | None  # d meta-loss / d soft labels (None when labels are fixed)
    meta_loss: float
    start: int  # window start s
    window: int  # window length W
    seconds: float
    starts: list[int] | None = None  # each sample's window start, when a task runs several (batched.py)


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


class Unroll:
    """One sample's network, inner optimizer and random stream, shared by the plain and the checkpointed path so
    both run the same steps with the same random draws in the same order: the window's minibatches and
    augmentations, then the real batch and its augmentation."""

    def __init__(self, syn: SynSet, model_factory: ModelFactory, cfg: RatBpttConfig, aug: AugmentConfig, seed: int):
        images, hard_labels, soft_labels = syn.images, syn.hard_labels, syn.soft_labels
        self.cfg, self.aug, self.dtype = cfg, aug, images.dtype
        self.rng = torch.Generator().manual_seed(seed)
        self.start, self.window = plan_window(cfg, self.rng)
        num_classes = int(hard_labels.max()) + 1 if soft_labels is None else soft_labels.shape[1]
        self.by_class = class_index(hard_labels.cpu(), num_classes)
        self.model: nn.Module = seeded_network(model_factory, self.rng, images)
        set_conv_channels_last(self.model, cfg.channels_last)
        named = list(self.model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.opt = make_inner_optimizer(cfg.inner_optimizer, cfg.inner_lr, cfg.inner_momentum)
        self.bf16 = cfg.precision == "bf16"
        self.device_type = images.device.type
        self.compiled = (compiled_loss(self.model, self.names, self.shapes, self.sizes, cfg.channels_last)
                         if cfg.compile_prefix else None)

    def logits(self, params: list[Tensor], x: Tensor, low_precision: bool) -> Tensor:
        """The network's output at `params`. With bf16 and `low_precision` (the window and the meta-loss), the
        forward runs under autocast and the logits return to float32, so the losses (and everything the backward
        accumulates from them) stay in float32."""
        bf16 = self.bf16 and low_precision
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=bf16):
            out = functional_call(self.model, self.unflatten(params), (x,))
        return out.float() if bf16 else out

    def flatten(self, params: list[Tensor]) -> list[Tensor]:
        """The network's parameters as the one flat vector the inner optimizer updates: one elementwise op per
        Adam term for the whole network instead of one per parameter tensor (the per-op overhead is most of a
        small network's optimizer cost). The same arithmetic elementwise; the meta-gradient moves by float32 rounding
        only, since autograd accumulates some terms in another order."""
        return [torch.cat([p.reshape(-1) for p in params])]

    def unflatten(self, params: list[Tensor]) -> dict[str, Tensor]:
        """name -> view of the flat vector, for functional_call."""
        return {n: t.view(s) for n, t, s in zip(self.names, params[0].split(self.sizes), self.shapes)}

    def inner_batch(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """One inner step's (augmented inputs, targets): its minibatch of the synthetic set, then its augmentation."""
        idx = sample_synthetic_batch(self.by_class, self.cfg, self.rng)
        if idx is not None:
            idx = idx.to(x.device)
            x, targets = x[idx], targets[idx]
        return augment(x, self.rng, self.aug), targets

    def inner_loss(self, params: list[Tensor], x: Tensor, targets: Tensor, low_precision: bool) -> Tensor:
        x, targets = self.inner_batch(x, targets)
        return soft_cross_entropy(self.logits(params, x, low_precision), targets)

    def step(self, params: list[Tensor], state: InnerState, x: Tensor, targets: Tensor, create_graph: bool,
             window: bool = True) -> tuple[list[Tensor], InnerState]:
        """One inner step: differentiable with create_graph (the window), otherwise graph-free (the prefix and the
        checkpointed forward), so a long prefix costs no memory. Only window steps run in bf16 when it is on: a bf16
        prefix moves the network away from the float32 one (the cosine test in tests/unit/test_window_options.py)."""
        if create_graph:
            grads = torch.autograd.grad(self.inner_loss(params, x, targets, window), params, create_graph=True)
            return self.opt.step(params, list(grads), state)
        params = [p.detach().requires_grad_(True) for p in params]
        if self.compiled is not None and not window:  # the prefix (compiled.py: never the window's graph)
            loss = self.compiled(params[0], *self.inner_batch(x, targets))
        else:
            loss = self.inner_loss(params, x, targets, window)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            return self.opt.step(params, list(grads), state)

    def prefix(self, x: Tensor, targets: Tensor) -> tuple[list[Tensor], InnerState]:
        """The first `start` steps from the fresh init: ordinary training, so no gradient ever reaches the synthetic
        set through them. Returns the window start, detached: the optimizer moments carry over as constants."""
        params = self.flatten([p.detach() for p in self.model.parameters()])
        state = self.opt.init(params)
        x, targets = x.detach(), targets.detach()
        for _ in range(self.start):
            params, state = self.step(params, state, x, targets, create_graph=False, window=False)
        return [p.detach() for p in params], state.detached()

    def real_batch(self, real: RealBatch) -> tuple[Tensor, Tensor]:
        """The meta-loss's augmented real batch and its labels (the last draws of a sample)."""
        pick = torch.randperm(real.x.shape[0], generator=self.rng)[: self.cfg.real_batch].to(real.x.device)
        return augment(real.x[pick], self.rng, self.aug).to(self.dtype), real.y[pick]

    def meta_loss(self, params: list[Tensor], real: RealBatch) -> Tensor:
        """Cross-entropy of the network at `params` on an augmented real batch."""
        x_real, y_real = self.real_batch(real)
        return F.cross_entropy(self.logits(params, x_real, True), y_real)

    def meta_loss_and_gradient(self, final: list[Tensor], real: RealBatch) -> tuple[Tensor, list[Tensor]]:
        """(meta-loss, its gradient with respect to `final`), the final parameters as detached leaves that require
        grad. With `real_batch_chunks` > 1 the batch is drawn and augmented whole (the same draws as one batch), then
        run in near-equal chunks: chunk i adds its mean cross-entropy weighted by its share of the batch, so the sum
        is the batch's mean, and only one chunk's activations are alive at a time."""
        chunks = self.cfg.real_batch_chunks
        if chunks == 1:
            loss = self.meta_loss(final, real)
            return loss.detach(), list(torch.autograd.grad(loss, final))
        x_real, y_real = self.real_batch(real)
        chunks = min(chunks, len(y_real))  # no empty chunk when the real set is smaller than real_batch (unvalidated)
        loss, grads = 0.0, [torch.zeros_like(p) for p in final]
        for x, y in zip(x_real.tensor_split(chunks), y_real.tensor_split(chunks)):
            part = F.cross_entropy(self.logits(final, x, True), y) * (len(y) / len(y_real))
            for g, d in zip(grads, torch.autograd.grad(part, final)):  # frees this chunk's graph
                g.add_(d)
            loss = loss + part.detach()
        return loss, grads


def unrolled_window(
    syn: SynSet,
    model_factory: ModelFactory,
    cfg: RatBpttConfig,
    aug: AugmentConfig,
    seed: int,
    prefix: SynSet | None = None,
) -> tuple[Unroll, list[Tensor]]:
    """The unroll and its final parameters, with the window's graph: the first `start` steps train on `prefix`
    (default: `syn`, detached), the window's steps on `syn`."""
    unroll = Unroll(syn, model_factory, cfg, aug, seed)
    prefix = syn if prefix is None else prefix
    params, state = unroll.prefix(prefix.images, prefix.targets)

    # Window: differentiable steps from the (constant) window start.
    params = [p.requires_grad_(True) for p in params]
    for _ in range(unroll.window):
        params, state = unroll.step(params, state, syn.images, syn.targets, create_graph=True)
    return unroll, params


def unrolled_meta_loss(
    syn: SynSet,
    real: RealBatch,
    model_factory: ModelFactory,
    cfg: RatBpttConfig,
    aug: AugmentConfig,
    seed: int,
    prefix: SynSet | None = None,
) -> tuple[Tensor, int, int]:
    """The meta-loss after an unroll whose first `start` steps train on `prefix` (default: `syn`, detached).

    The truncated RaT-BPTT gradient is exactly the derivative of this function with respect to `syn.images` and
    `syn.soft_labels` when the prefix inputs are held fixed, which is what the finite-difference tests check.
    Returns (meta_loss, start, window). The real batch runs whole here (`real_batch_chunks` changes how the
    gradient is taken, not the function).
    """
    unroll, params = unrolled_window(syn, model_factory, cfg, aug, seed, prefix)
    return unroll.meta_loss(params, real), unroll.start, unroll.window


def chunked_meta_loss_and_gradient(
    syn: SynSet,
    real: RealBatch,
    model_factory: ModelFactory,
    cfg: RatBpttConfig,
    aug: AugmentConfig,
    seed: int,
) -> tuple[Tensor, list[Tensor], int, int]:
    """(meta-loss, gradient w.r.t. images [and soft labels], start, window) of the plain window with the real batch
    in `cfg.real_batch_chunks` chunks: the chunks' gradients at the final parameters are summed first, then go back
    through the window's graph in one backward pass."""
    unroll, params = unrolled_window(syn, model_factory, cfg, aug, seed)
    leaves = [syn.images] if syn.soft_labels is None else [syn.images, syn.soft_labels]
    loss, d_final = unroll.meta_loss_and_gradient([p.detach().requires_grad_(True) for p in params], real)
    grads = torch.autograd.grad(params, leaves, grad_outputs=d_final)
    return loss, list(grads), unroll.start, unroll.window


def checkpointed_meta_loss_and_gradient(
    syn: SynSet,
    real: RealBatch,
    model_factory: ModelFactory,
    cfg: RatBpttConfig,
    aug: AugmentConfig,
    seed: int,
) -> tuple[Tensor, list[Tensor], int, int]:
    """(meta-loss, gradient w.r.t. images [and soft labels], start, window) with the window recomputed in
    `cfg.window_segments` segments (clamped to the window length) during the backward pass."""
    unroll = Unroll(syn, model_factory, cfg, aug, seed)
    images, targets = syn.images, syn.targets
    params, state = unroll.prefix(images, targets)
    leaves = [images] if syn.soft_labels is None else [images, syn.soft_labels]

    def step(params: list[Tensor], state: InnerState, create_graph: bool) -> tuple[list[Tensor], InnerState]:
        return unroll.step(params, state, images, targets, create_graph)

    loss, grads = checkpointed_window_gradient(
        step, lambda p: unroll.meta_loss_and_gradient(p, real), params, state,
        segment_lengths(unroll.window, cfg.window_segments), leaves, unroll.rng,
    )
    return loss, grads, unroll.start, unroll.window


def as_leaves(syn: SynSet) -> tuple[SynSet, list[Tensor]]:
    """A copy of the synthetic set whose images (and soft labels) are detached tensors that require grad (the
    inputs stay untouched), and the list of them that the meta-gradient is taken with respect to."""
    images = syn.images.detach().requires_grad_(True)
    if syn.soft_labels is None:
        return SynSet(images, syn.hard_labels), [images]
    soft_labels = syn.soft_labels.detach().requires_grad_(True)
    return SynSet(images, syn.hard_labels, soft_labels), [images, soft_labels]


def meta_gradient(
    syn: SynSet,
    real: RealBatch,
    model_factory: ModelFactory,
    cfg: RatBpttConfig,
    aug: AugmentConfig,
    seed: int,
) -> MetaGradient:
    """One RaT-BPTT meta-gradient sample for the synthetic set (images, labels); inputs are not modified."""
    began = time.perf_counter()
    syn, leaves = as_leaves(syn)
    args = (syn, real, model_factory, cfg, aug, seed)
    if cfg.window_segments > 1:
        loss, grads, start, window = checkpointed_meta_loss_and_gradient(*args)
    elif cfg.real_batch_chunks > 1:
        loss, grads, start, window = chunked_meta_loss_and_gradient(*args)
    else:
        loss, start, window = unrolled_meta_loss(*args)
        grads = torch.autograd.grad(loss, leaves)
    return MetaGradient(
        images=grads[0],
        labels=grads[1] if syn.soft_labels is not None else None,
        meta_loss=float(loss.detach()),
        start=start,
        window=window,
        seconds=time.perf_counter() - began,
    )
