"""Networks for distillation and cross-architecture evaluation, behind a timm-like registry.

Adding an architecture is one decorated builder::

    @register_model("mynet")
    def mynet(in_channels, num_classes, image_size, width=128, depth=3, norm="instance") -> nn.Module: ...

Every model here is written for the differentiable inner loop: it runs under
`torch.func.functional_call(model, params, (x,))`, in float32 or float64, and supports double backward
(gradients of gradients, `create_graph=True`) with respect to both the parameters and the input. That rules out
in-place activations (`F.relu`, never `inplace=True`) and in-place updates of activations (`out = out + skip`).

Norms follow the dataset-distillation literature: `instance` is `GroupNorm(c, c, affine=True)` (one group per
channel: per-sample, per-channel statistics with a learnable affine, which is what the field calls "instance
norm"), `batch` is `BatchNorm2d`, `none` is `Identity`. Initialisation is PyTorch's default, so a model built
after `torch.manual_seed(s)` is reproducible.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from raydistill.config.core import NORMS, ConfigError

__all__ = ["MODELS", "register_model", "create_model", "make_norm", "ConvNet", "AlexNet", "VGG11", "ResNet18"]

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


class _ConvNormReLU(nn.Module):
    """conv -> norm -> ReLU, the building block shared by the plain (non-residual) nets."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=True)
        self.norm = make_norm(norm, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


# ---------------------------------------------------------------------------------------------- ConvNet


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet: `depth` x [conv3x3(width) -> norm -> ReLU -> avgpool 2x2] -> linear.

    Each pool floors the spatial size (28 -> 14 -> 7 -> 3), and the head sees the flattened
    width x s x s map, so the head's size depends on `image_size` and `depth`.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int, depth: int, norm: str):
        super().__init__()
        size = image_size
        for _ in range(depth):
            size //= 2
        if size < 1:
            raise ConfigError(
                f"model.depth: {depth} pooling blocks shrink {image_size}x{image_size} images to nothing; "
                f"set model.depth <= {max(image_size.bit_length() - 1, 1)}"
            )
        blocks = [_ConvNormReLU(in_channels if i == 0 else width, width, 3, 1, norm) for i in range(depth)]
        self.features = nn.Sequential(*[nn.Sequential(b, nn.AvgPool2d(2)) for b in blocks])
        self.head = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@register_model("convnet")
def convnet(in_channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
            norm: str = "instance") -> nn.Module:
    """ConvNet-`depth` with `width` channels (ConvNet-3 for 28/32 px, ConvNet-4 for 64 px is the usual choice)."""
    return ConvNet(in_channels, num_classes, image_size, width, depth, norm)


# ---------------------------------------------------------------------------------------------- AlexNet


class AlexNet(nn.Module):
    """Small-image AlexNet: five convs (128, 192, 256, 192, 192), max-pools after the 1st, 2nd and 5th, linear head.

    Sized for 32 px (a 192 x 4 x 4 map reaches the head); the head follows the pooled size for other inputs
    (3 x 3 at 28 px, 8 x 8 at 64 px).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, norm: str):
        super().__init__()
        size = image_size // 2 // 2 // 2
        if size < 1:
            raise ConfigError(f"model: alexnet needs images of at least 8x8, got {image_size}x{image_size}")
        self.features = nn.Sequential(
            _ConvNormReLU(in_channels, 128, 5, 2, norm),
            nn.MaxPool2d(2),
            _ConvNormReLU(128, 192, 5, 2, norm),
            nn.MaxPool2d(2),
            _ConvNormReLU(192, 256, 3, 1, norm),
            _ConvNormReLU(256, 192, 3, 1, norm),
            _ConvNormReLU(192, 192, 3, 1, norm),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(192 * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@register_model("alexnet")
def alexnet(in_channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
            norm: str = "instance") -> nn.Module:
    """Small-image AlexNet; `width` and `depth` are ignored (the architecture is fixed)."""
    return AlexNet(in_channels, num_classes, image_size, norm)


# ---------------------------------------------------------------------------------------------- VGG-11

_VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 for small images: the standard cfg of 3x3 convs with norm, then global average pool and a linear head.

    Pools use ceil_mode so odd sizes never collapse to zero (28 -> 14 -> 7 -> 4 -> 2 -> 1); at 32 px the map is
    already 1 x 1 before the global pool, which only matters for larger inputs (2 x 2 at 64 px).
    """

    def __init__(self, in_channels: int, num_classes: int, norm: str):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in _VGG11_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers.append(_ConvNormReLU(cin, int(item), 3, 1, norm))
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


@register_model("vgg11")
def vgg11(in_channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
          norm: str = "instance") -> nn.Module:
    """Small-image VGG-11; `width`, `depth` and `image_size` are ignored (global pooling makes it size-agnostic)."""
    return VGG11(in_channels, num_classes, norm)


# ---------------------------------------------------------------------------------------------- ResNet-18


class _BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 conv projects the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        bias = norm == "none"  # a norm's own shift makes a conv bias redundant; without a norm keep it
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.norm2 = make_norm(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), make_norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # not `out += ...`: the sum must stay a new node for double backward


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max-pool, four stages of two blocks (64-512 channels), GAP, linear."""

    def __init__(self, in_channels: int, num_classes: int, norm: str):
        super().__init__()
        bias = norm == "none"
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=bias), make_norm(norm, 64))
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(cin, cout, stride, norm), _BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.stem(x)))
        return self.head(self.pool(out).flatten(1))


@register_model("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
             norm: str = "instance") -> nn.Module:
    """CIFAR-style ResNet-18; `width`, `depth` and `image_size` are ignored (global pooling makes it size-agnostic)."""
    return ResNet18(in_channels, num_classes, norm)
