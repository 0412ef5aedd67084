"""Building blocks shared by several architectures (each free of in-place ops, for double backward)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from raydistill.models.registry import make_norm


class ConvNormReLU(nn.Module):
    """conv -> norm -> ReLU, the building block of the plain (non-residual) nets."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int, norm: str):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=True)
        self.norm = make_norm(norm, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class BasicBlock(nn.Module):
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
