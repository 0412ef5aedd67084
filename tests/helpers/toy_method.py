"""A toy distillation method, written only against the Method interface: match each class's mean real image.

The tests run it through `raydistill distill`, `boost` and `tune` to show that a method needs nothing outside its
own file. It also keeps a per-slot task counter as worker-side state, which the engine must carry exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raydistill.config.checks import positive
from raydistill.config.errors import ConfigError
from raydistill.methods.base import IMAGES, Gradient, Method, task_seed


@dataclass
class ToyMeanConfig:
    real_batch: int = 64  # real images drawn per task


class ToyMean(Method):
    name = "toy_mean"
    config_cls = ToyMeanConfig
    needs = ("train_data",)

    def validate(self, section, cfg):
        positive(section.real_batch, "toy_mean.real_batch")
        if cfg.labels.learn:
            raise ConfigError("labels.learn: toy_mean learns images only; set labels.learn=false")

    def validate_against_data(self, section, cfg, num_train, num_classes):
        if section.real_batch > num_train:
            raise ConfigError(f"toy_mean.real_batch: {section.real_batch} > {num_train} training images")

    def setup(self, cfg, resources):
        return {"cfg": cfg, "x": resources.train_x, "y": resources.train_y}

    def gradient(self, context, learnables, hard_labels, step, slot, slot_state):
        cfg = context["cfg"]
        rng = torch.Generator().manual_seed(task_seed(cfg.seed, step, slot))
        pick = torch.randperm(len(context["y"]), generator=rng)[: cfg.method_config.real_batch]
        x, y = context["x"][pick], context["y"][pick]
        images = learnables[IMAGES].detach().requires_grad_(True)
        loss = images.new_zeros(())
        for c in hard_labels.unique():
            real = x[y == c]
            if len(real):
                loss = loss + (images[hard_labels == c].mean(0) - real.mean(0)).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, images)
        tasks = 0 if slot_state is None else int(slot_state["tasks"][0])
        return Gradient({IMAGES: grad}, float(loss), {"classes": int(hard_labels.unique().numel())},
                        slot_state={"tasks": np.array([tasks + 1])})
