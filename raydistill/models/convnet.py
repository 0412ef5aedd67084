"""The dataset-distillation ConvNet, the network the field distils with and reports first."""

from __future__ import annotations

import torch
import torch.nn as nn

from raydistill.config import ConfigError
from raydistill.models.layers import AvgPool2x2, ConvNormReLU
from raydistill.models.registry import register_model


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet: `depth` x [conv3x3(width) -> norm -> ReLU -> avgpool 2x2] -> linear.

    Each pool floors the spatial size (28 -> 14 -> 7 -> 3), and the head sees the flattened
    width x s x s map, so the head's size (and `features`' width) depends on `image_size` and `depth`.
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
        blocks = [ConvNormReLU(in_channels if i == 0 else width, width, 3, 1, norm) for i in range(depth)]
        self.body = nn.Sequential(*[nn.Sequential(b, AvgPool2x2()) for b in blocks])
        self.head = nn.Linear(width * size * size, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened width x s x s map the head reads."""
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("convnet")
def convnet(in_channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
            norm: str = "instance") -> nn.Module:
    """ConvNet-`depth` with `width` channels (ConvNet-3 for 28/32 px, ConvNet-4 for 64 px is the usual choice)."""
    return ConvNet(in_channels, num_classes, image_size, width, depth, norm)
