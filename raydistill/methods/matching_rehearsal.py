"""One gradient task of a matching method (DM, DC, DSA, CAFE), rehearsed on the meta device for the memory planner
(raydistill.plan).

A rehearsal runs the method's own code: its seeded network (built on the CPU, then moved to the meta device, so its
parameters are counted), the training episode (`train_on_synthetic`), DC's BatchNorm rule, the method's own loss over
the classes and the gradient with respect to the synthetic images. The synthetic and the real images are meta
tensors; the labels the loss reads values of (`present_classes`, `synthetic_of_class`) stay on the CPU. The real
images stand for the data a worker holds, which the planner counts on its own: they are made outside the meter.

Each class's graph stays alive until the backward pass, so a task's memory grows with the classes, and a meta op
costs about a millisecond of Python: a rehearsal holds the whole synthetic set and the network's episode, but runs
the loss over its first 2 and 3 classes (CAFE: 2, 3 and 4) only, and each phase is extrapolated to every class
(linearly; CAFE's quadratically, its discrimination term holding real images x classes logits).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from raydistill.config.schema import AugmentConfig, DistillConfig
from raydistill.data.augment import apply_params, siamese_params
from raydistill.data.selection import class_index
from raydistill.memory import LiveBytes
from raydistill.methods.matching import (
    BN_IMAGES_PER_CLASS,
    EpisodeConfig,
    MatchingContext,
    NetSchedule,
    resolved_loops,
    train_on_synthetic,
)
from raydistill.methods.rehearsal import META, DataShape, Phase, PhaseRecorder, TaskMemory, linear, meta_empty
from raydistill.models.registry import build_network, network_from_seed


@dataclass
class Rehearsal:
    """What a method's rehearsal body runs on: a context whose real images (meta) fill `classes` classes, the task's
    network (still on the CPU), the whole synthetic set and the labels of the classes the loss is taken over."""

    cfg: DistillConfig
    ctx: MatchingContext
    model: nn.Module
    images: Tensor  # every synthetic image: a meta leaf that requires grad
    hard: Tensor  # the CPU labels of the first `classes` classes' images, so the loss covers those classes
    labels: Tensor  # every image's label, on the meta device (the episode indexes them there)
    rng: torch.Generator


Body = Callable[[PhaseRecorder, Rehearsal], None]  # runs a method's phases after the network's


def _rehearsal(cfg: DistillConfig, shape: DataShape, classes: int) -> tuple[Rehearsal, Tensor]:
    """The set-up of a rehearsal whose loss covers `classes` classes, and every image's CPU label (held)."""
    nc, (c, h, w) = shape.num_classes, shape.image_shape
    rows = max(cfg.method_config.batch_real, BN_IMAGES_PER_CLASS)  # real images per class: every draw is full
    real_y = torch.arange(classes).repeat_interleave(rows)

    def factory() -> nn.Module:
        return build_network(cfg.model.name, cfg.model, shape.image_shape, nc)

    ctx = MatchingContext(cfg, meta_empty((len(real_y), c, h, w)), real_y, class_index(real_y, classes), factory)
    hard = torch.arange(nc).repeat_interleave(cfg.ipc)
    images = meta_empty((len(hard), c, h, w), requires_grad=True)
    model = network_from_seed(factory, 0)  # the caller's global RNG is left as it was
    r = Rehearsal(cfg, ctx, model, images, hard[:classes * cfg.ipc], hard.to(META), torch.Generator())
    return r, hard


def rehearse_classes(cfg: DistillConfig, shape: DataShape, classes: int, body: Body) -> PhaseRecorder:
    """The phases of one task whose loss covers the first `classes` classes: "network", then `body`'s."""
    r, hard = _rehearsal(cfg, shape, classes)
    with LiveBytes() as meter:
        rec = PhaseRecorder(meter)
        meter.hold(r.images, hard)
        with rec.phase("network"):
            r.model = r.model.to(META).train()
        body(rec, r)
        del r
    return rec


def episode(rec: PhaseRecorder, r: Rehearsal, section: EpisodeConfig, aug: AugmentConfig | None) -> None:
    """The seeded episode's network training at its largest (a position k >= 1), phase "episode": two SGD steps on
    full batches of the synthetic set, the second with the first's parameter gradients alive, as every later step
    has them. Nothing when the position is always 0 (outer_loop 1): the network is never trained."""
    outer, _ = resolved_loops(section, r.cfg.ipc)
    if outer <= 1:
        return
    n, batch = r.images.shape[0], section.batch_train
    m = min(n, 2 * batch)  # a view: the images' bytes are counted once
    with rec.phase("episode"):
        schedule = NetSchedule(2 if n <= batch else 1, section.lr_net, batch)
        train_on_synthetic(r.model, r.images[:m], r.labels[:m], schedule, r.rng, aug)


def costliest_strategy(cfg: DistillConfig, shape: DataShape) -> str | None:
    """Of the listed augmentations, the one whose graph on one class's synthetic images holds the most bytes: each
    class draws its own, and the plan takes this one for all (None: no augmentation)."""
    strategies = cfg.augment.strategies
    if len(strategies) <= 1:
        return strategies[0] if strategies else None
    x = meta_empty((cfg.ipc, *shape.image_shape), requires_grad=True)
    held = {}
    for s in strategies:
        with LiveBytes() as meter:
            params = siamese_params(torch.Generator(), replace(cfg.augment, strategies=[s]))
            y = apply_params(x * 1, params)  # a fresh input, as the loss's indexed images are
            held[s] = (meter.live, meter.peak)
            del y
    return max(strategies, key=lambda s: held[s])


def with_strategy(cfg: DistillConfig, strategy: str | None) -> DistillConfig:
    """`cfg` with `strategy` its only augmentation (unchanged when it has at most one)."""
    if strategy is None or len(cfg.augment.strategies) <= 1:
        return cfg
    return replace(cfg, augment=replace(cfg.augment, strategies=[strategy]))


def quadratic(at_1: int, at_2: int, at_3: int, n: int) -> int:
    """The value at n of the parabola through (1, at_1), (2, at_2) and (3, at_3)."""
    return at_1 + (n - 1) * (at_2 - at_1) + (n - 1) * (n - 2) // 2 * (at_3 - 2 * at_2 + at_1)


def extrapolate(recs: list[PhaseRecorder], n: int) -> dict[str, Phase]:
    """Every phase at n classes, through rehearsals at 2, 3 (and 4) classes: a line through two, a parabola through
    three. (Not from 1 class: from the second class on, the loss also holds the previous class's last values while
    it computes the next, so the first class is not on the line.)"""
    fit = linear if len(recs) == 2 else quadratic

    def at_n(name: str, key: str) -> int:
        return fit(*(getattr(rec.phases[name], key) for rec in recs), n - 1)

    return {name: Phase(at_n(name, "start"), at_n(name, "end"), at_n(name, "peak")) for name in recs[0].phases}


def rehearse_matching(cfg: DistillConfig, shape: DataShape, body: Body, points: int = 2) -> dict[str, Phase]:
    """The phases of one task over every class: rehearsed at 2 .. `points` + 1 classes and extrapolated, or rehearsed
    whole when there are no more classes than that."""
    nc = shape.num_classes
    if nc <= points + 1:
        return dict(rehearse_classes(cfg, shape, nc, body).phases)
    return extrapolate([rehearse_classes(cfg, shape, k, body) for k in range(2, points + 2)], nc)


def task_memory(cfg: DistillConfig, shape: DataShape, phases: dict[str, Phase], notes: list[str]) -> TaskMemory:
    """The task's peak (its largest phase) and its terms, summing to the peak."""
    peak_phase = max(phases, key=lambda name: phases[name].peak)
    peak = phases[peak_phase].peak
    net = phases["network"]
    terms = {"synthetic set": net.start, "network": net.end - net.start}
    if "episode" in phases:
        terms["network gradients (the episode's last step)"] = max(0, phases["episode"].end - phases["episode"].start)
    loss = phases["matching loss"]
    if peak_phase in ("matching loss", "discrimination", "backward"):
        terms[f"matching graphs ({shape.num_classes} classes)"] = min(loss.end, peak) - loss.start
    rest = {"episode": "network training step",
            "batchnorm": f"BatchNorm statistics ({BN_IMAGES_PER_CLASS} real images x {shape.num_classes} classes)",
            "matching loss": "real batch forward (per class)",
            "discrimination": "discrimination (real embeddings x classes)"}.get(peak_phase, "backward and transients")
    terms[rest] = peak - sum(terms.values())
    parts = {"base": terms["synthetic set"] + terms["network"], "per_class": (loss.end - loss.start) / max(
        shape.num_classes, 1)}
    return TaskMemory(peak=peak, terms=terms, notes=notes, parts=parts)


def _notes(cfg: DistillConfig, shape: DataShape, strategy: str | None, phases: dict[str, Phase],
           extrapolated: bool) -> list[str]:
    """What a matching rehearsal approximates, for the plan's reader."""
    notes = [f"real images: {cfg.method_config.batch_real} per class, every class drawn in full (one with fewer "
             "holds less), as float32 batches (a batch read from uint8 pixels also holds those for a moment)"]
    if len(cfg.augment.strategies) > 1 and strategy is not None:
        notes.append(f"augmentation: each class draws one of {len(cfg.augment.strategies)} strategies; planned as "
                     f"{strategy} (the one whose graph holds the most) for every class")
    if "episode" in phases:
        notes.append("the seeded episode is planned at a position k >= 1: its last step's parameter gradients stay "
                     "alive through the matching loss (at k = 0 there are none)")
    if extrapolated:
        notes.append(f"the loss is rehearsed over its first classes and extrapolated to {shape.num_classes}")
    return notes


def rehearse_task(cfg: DistillConfig, shape: DataShape, body: Body, strategy: str | None,
                  points: int = 2) -> TaskMemory:
    """One task of a matching method whose phases after the network's are `body`'s, with `strategy` its only
    augmentation (`costliest_strategy`; None: as configured), over every class (`rehearse_matching`)."""
    phases = rehearse_matching(with_strategy(cfg, strategy), shape, body, points)
    notes = _notes(cfg, shape, strategy, phases, shape.num_classes > points + 1)
    return task_memory(cfg, shape, phases, notes)
