"""The model registry: `create_model("name", ...)` builds any registered architecture (timm's idea).

Adding an architecture is one decorated builder in its own module, imported by `raydistill/models/__init__.py`::

    @register_model("mynet")
    def mynet(in_channels, num_classes, image_size, width=128, depth=3, norm="instance") -> nn.Module: ...

The built-in architectures live in `convnet.py` (ConvNet) and `classic.py` (AlexNet, VGG-11, ResNet-18). Importing
anything under `raydistill.models`, this module included, runs the package `__init__` first, which imports them and so
fills `MODELS`; this module imports no architecture, so there is no import cycle.

Every model here is written for the differentiable inner loop: it runs under
`torch.func.functional_call(model, params, (x,))`, in float32 or float64, and supports double backward
(gradients of gradients, `create_graph=True`) with respect to both the parameters and the input. That rules out
in-place activations (`F.relu`, never `inplace=True`) and in-place updates of activations (`out = out + skip`).
Every built-in model also has `features(x)`, the flattened penultimate embedding, with `forward(x) ==
head(features(x))` (timm's `forward_features`): coreset baselines select images in that embedding.

Norms follow the dataset-distillation literature: `instance` is `GroupNorm(c, c, affine=True)` (one group per
channel: per-sample, per-channel statistics with a learnable affine, which is what the field calls "instance
norm"), `batch` is `BatchNorm2d`, `none` is `Identity`. Initialisation is PyTorch's default, so a model built
after `torch.manual_seed(s)` is reproducible.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from raydistill.config import ConfigError, ModelConfig
from raydistill.config.schema import NORMS
from raydistill.models.speed import set_cpu_kernels

__all__ = ["MODELS", "register_model", "create_model", "make_norm"]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder `fn(in_channels, num_classes, image_size, width, depth, norm)` under `name`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return wrap


def create_model(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    width: int = 128,
    depth: int = 3,
    norm: str = "instance",
) -> nn.Module:
    """Build a fresh registered model for square `image_size` x `image_size` inputs with `in_channels` channels.

    `width` and `depth` shape the ConvNet only; the fixed architectures (alexnet, vgg11, resnet18) ignore them.
    Raises `ConfigError` for an unknown name, norm, or a ConvNet too deep for the image size.
    """
    if name not in MODELS:
        raise ConfigError(f"model: unknown name {name!r}; choose one of {', '.join(sorted(MODELS))}")
    if norm not in NORMS:
        raise ConfigError(f"model.norm: unknown value {norm!r}; choose one of {', '.join(NORMS)}")
    return MODELS[name](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width, depth=depth, norm=norm
    )


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer for `channels` feature maps: instance (GroupNorm(c, c)), batch, or none."""
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"model.norm: unknown value {norm!r}; choose one of {', '.join(NORMS)}")


def build_network(arch: str, model: ModelConfig, image_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A fresh `arch` for (C, H, W) images, shaped by the `model` section (initialised from the global RNG), its
    speed layers as `model.cpu_kernels` says (raydistill.models.speed)."""
    c, h = image_shape[0], image_shape[1]
    network = create_model(arch, c, num_classes, h, width=model.width, depth=model.depth, norm=model.norm)
    set_cpu_kernels(network, model.cpu_kernels)
    return network


def network_from_seed(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """`make()` initialised from `seed` alone, under a forked RNG: the caller's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


INFERENCE_PIXELS = 2048 * 32 * 32  # pixels per no-grad forward of an accuracy pass: 2048 CIFAR-sized images


def inference_batch(image_shape: tuple[int, ...]) -> int:
    """Images per no-grad forward when measuring accuracy: 2048 up to 32x32, fewer for larger images so a pass
    holds about as much as 2048 CIFAR images (128 at 128x128), instead of 17 GB of first-layer activations."""
    return max(16, min(2048, INFERENCE_PIXELS // (image_shape[-1] * image_shape[-2])))
