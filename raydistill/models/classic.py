"""Fixed architectures for cross-architecture evaluation: small-image AlexNet, VGG-11 and ResNet-18.

Their sizes are fixed; the registry's `width` and `depth` arguments are accepted and ignored.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from raydistill.config import ConfigError
from raydistill.models.layers import BasicBlock, ConvNormReLU
from raydistill.models.registry import make_norm, register_model

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
        self.body = nn.Sequential(
            ConvNormReLU(in_channels, 128, 5, 2, norm),
            nn.MaxPool2d(2),
            ConvNormReLU(128, 192, 5, 2, norm),
            nn.MaxPool2d(2),
            ConvNormReLU(192, 256, 3, 1, norm),
            ConvNormReLU(256, 192, 3, 1, norm),
            ConvNormReLU(192, 192, 3, 1, norm),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(192 * size * size, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened 192 x s x s map the head reads."""
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


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
                layers.append(ConvNormReLU(cin, int(item), 3, 1, norm))
                cin = int(item)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 512 globally pooled channels the head reads."""
        return self.pool(self.body(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("vgg11")
def vgg11(in_channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
          norm: str = "instance") -> nn.Module:
    """Small-image VGG-11; `width`, `depth` and `image_size` are ignored (global pooling makes it size-agnostic)."""
    return VGG11(in_channels, num_classes, norm)


# ---------------------------------------------------------------------------------------------- ResNet-18


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max-pool, four stages of two blocks (64-512 channels), GAP, linear."""

    def __init__(self, in_channels: int, num_classes: int, norm: str):
        super().__init__()
        bias = norm == "none"
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=bias), make_norm(norm, 64))
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 512 globally pooled channels the head reads."""
        return self.pool(self.layers(F.relu(self.stem(x)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
             norm: str = "instance") -> nn.Module:
    """CIFAR-style ResNet-18; `width`, `depth` and `image_size` are ignored (global pooling makes it size-agnostic)."""
    return ResNet18(in_channels, num_classes, norm)
