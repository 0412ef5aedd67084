"""RaT-BPTT as a Method: the registry entry that connects the meta-gradient to the engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from raydistill.config.schema import DistillConfig
from raydistill.methods.base import (
    IMAGES,
    SOFT_LABELS,
    Gradient,
    Lever,
    Method,
    ModelFactory,
    WorkerResources,
    task_seed,
)
from raydistill.methods.ratbptt.batched import batched_meta_gradient
from raydistill.methods.ratbptt.config import RatBpttConfig, validate_against_data, validate_section
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient
from raydistill.methods.ratbptt.rehearse import approximate_peak, memory_levers, rehearse, step_flops
from raydistill.methods.rehearsal import DataShape, TaskMemory


@dataclass
class RatBpttContext:
    cfg: DistillConfig
    real_x: Tensor
    real_y: Tensor
    model_factory: ModelFactory


class RatBptt(Method):
    """Random truncated back-propagation through time (Feng, Vedantam & Kempe, ICLR 2024)."""

    name = "ratbptt"
    config_cls = RatBpttConfig

    def validate(self, section: RatBpttConfig, cfg: DistillConfig) -> None:
        validate_section(section, cfg.model.norm)

    def validate_against_data(self, section: RatBpttConfig, cfg: DistillConfig, num_train: int,
                              num_classes: int) -> None:
        validate_against_data(section, cfg.ipc, num_train, num_classes)

    def setup(self, cfg: DistillConfig, resources: WorkerResources) -> RatBpttContext:
        return RatBpttContext(cfg, resources.train_x, resources.train_y, resources.model_factory)

    def gradient(self, context: RatBpttContext, learnables: dict[str, Tensor], hard_labels: Tensor, step: int,
                 slot: int, slot_state: dict[str, np.ndarray] | None) -> Gradient:
        cfg = context.cfg
        soft = learnables.get(SOFT_LABELS)
        sampler = batched_meta_gradient if cfg.method_config.samples_per_task > 1 else meta_gradient
        g = sampler(SynSet(learnables[IMAGES], hard_labels, soft), RealBatch(context.real_x, context.real_y),
                    context.model_factory, cfg.method_config, cfg.augment, task_seed(cfg.seed, step, slot))
        grads = {IMAGES: g.images}
        if soft is not None:
            grads[SOFT_LABELS] = g.labels
        stats = {"start": g.start, "window": g.window}
        if g.starts is not None:
            stats["starts"] = g.starts
        return Gradient(grads, g.meta_loss, stats)

    def rehearse(self, cfg: DistillConfig, shape: DataShape) -> TaskMemory:
        return rehearse(cfg, shape)

    def memory_levers(self, cfg: DistillConfig) -> list[Lever]:
        return memory_levers(cfg)

    def step_flops(self, cfg: DistillConfig, shape: DataShape) -> float:
        return step_flops(cfg, shape)

    def approximate_peak(self, cfg: DistillConfig, task: TaskMemory, changes: dict) -> int:
        return approximate_peak(cfg, task, changes)

    def describe(self, r: RatBpttConfig) -> str:
        return f"ratbptt T={r.unroll} W={r.window} {r.window_mode}"
