"""Building blocks shared by several architectures (each free of in-place ops, for double backward).

Conv2d, InstanceNorm and AvgPool2x2 are the plain torch modules they subclass, with speed paths for the inner loop
that each run only where `raydistill.models.speed.kernel_enabled` says (the `model.cpu_kernels` switch, set on a
network by `raydistill.models.speed.set_cpu_kernels`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from raydistill.compat import native_group_norm, native_group_norm_backward, slow_conv2d_forward, under_func_transform
from raydistill.models.registry import make_norm
from raydistill.models.speed import SpeedLayer, kernel_enabled
from raydistill.models.winograd import winograd_applies, winograd_conv3x3

# Inside torch.func transforms (vmap, grad: several samples per task; `under_func_transform`) the custom autograd
# Functions below have no functorch rules, so the layers then run the native ops they replace (the same function).


def _stats(t: Tensor) -> Tensor:
    """Sum over the spatial positions of each (sample, channel), kept as (N, C, 1, 1) for broadcasting."""
    return t.sum((2, 3), keepdim=True)


class _InstanceNormBackward(torch.autograd.Function):
    """The backward of instance norm, (gy, x, gamma) -> (gx, dgamma, dbeta), with an analytic backward of its own.

    Per (sample, channel), with M spatial positions, <.> the spatial mean, r = 1/sqrt(var + eps) and
    xhat = (x - mean) r: the first derivative is gx = gamma w with w = r (gy - <gy> - xhat k), k = <gy xhat>,
    dgamma = sum gy xhat and dbeta = sum gy. Given the incoming (u, p, q) for (gx, dgamma, dbeta) and
    v = r (u - <u> - xhat <u xhat>) (the same symmetric projection, applied to u):

        d/dgy    = gamma v + p xhat + q
        d/dgamma = sum v gy
        d/dx     = -r (xhat <u gx> + gamma k v + <u xhat> gx) + p w

    Every map above is affine in (gy, x, u) with per-(sample, channel) coefficients, so each output is one or two
    fused elementwise passes after a few spatial sums, instead of autograd's composite double backward of group norm.
    The value and the first derivative come from the native group-norm kernels. `tests/unit/test_models.py` checks both
    derivatives with gradcheck and gradgradcheck in float64.
    """

    @staticmethod
    def forward(ctx, gy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor):
        n, c = x.shape[:2]
        gx, dgamma, dbeta = native_group_norm_backward(gy, x, mean.view(n, c), rstd.view(n, c), weight, n, c,
                                                       x.shape[2] * x.shape[3], c, [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, rstd)
        return gx, dgamma, dbeta

    @staticmethod
    def backward(ctx, u: Tensor, p: Tensor, q: Tensor):
        gy, x, weight, mean, rstd = ctx.saved_tensors
        m = x.shape[2] * x.shape[3]
        mean_gy = _stats(gy) / m
        k = rstd * (_stats(gy * x) / m - mean * mean_gy)  # <gy xhat>
        r, gamma, p4, q4 = rstd, weight.view(1, -1, 1, 1), p.view(1, -1, 1, 1), q.view(1, -1, 1, 1)
        mean_u, mean_ux = _stats(u) / m, _stats(u * x) / m
        ku = r * (mean_ux - mean * mean_u)  # <u xhat>
        bv = -r * r * ku  # v = r u + bv x + cv
        cv = -bv * mean - r * mean_u
        d_gy = d_x = d_weight = None
        if ctx.needs_input_grad[0]:  # gamma v + p xhat + q
            d_gy = torch.addcmul(gamma * cv - p4 * r * mean + q4, u, gamma * r) + x * (gamma * bv + p4 * r)
        mean_ugy = _stats(u * gy) / m if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) else None
        if ctx.needs_input_grad[2]:  # sum v gy = sum_n M (r <u gy> + bv <x gy> + cv <gy>)
            mean_xgy = k / r + mean * mean_gy  # <gy x>, from k = r (<gy x> - mean <gy>)
            d_weight = ((r * mean_ugy + bv * mean_xgy + cv * mean_gy) * m).sum((0, 2, 3))
        if ctx.needs_input_grad[1]:
            bw = -r * r * k  # w = r gy + bw x + cw; gx = gamma w
            cw = -bw * mean - r * mean_gy
            a_gx, b_gx, c_gx = gamma * r, gamma * bw, gamma * cw
            mean_ugx = a_gx * mean_ugy + b_gx * mean_ux + c_gx * mean_u  # <u gx>
            # d_x = -r (xhat <u gx> + gamma k v + ku gx) + p w, expanded into coefficients of u, gy and x
            coef_u = -r * gamma * k * r
            coef_gy = -r * ku * a_gx + p4 * r
            coef_x = -r * (r * mean_ugx + gamma * k * bv + ku * b_gx) + p4 * bw
            const = -r * (-r * mean * mean_ugx + gamma * k * cv + ku * c_gx) + p4 * cw
            d_x = torch.addcmul(torch.addcmul(const, u, coef_u), gy, coef_gy) + x * coef_x
        return d_gy, d_x, d_weight, None, None


class _InstanceNorm(torch.autograd.Function):
    """Instance norm with a learnable per-channel affine (the native group-norm kernel); its backward is itself an
    autograd Function, so the unrolled inner loop's double backward is analytic."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float):
        n, c = x.shape[:2]
        y, mean, rstd = native_group_norm(x, weight, bias, n, c, x.shape[2] * x.shape[3], c, eps)
        mean, rstd = mean.view(n, c, 1, 1), rstd.view(n, c, 1, 1)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        gx, dgamma, dbeta = _InstanceNormBackward.apply(gy, x, weight, mean, rstd)
        return gx, dgamma, dbeta, None


def instance_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """GroupNorm with one channel per group and an affine, as `F.group_norm(x, C, weight, bias, eps)` computes it."""
    return _InstanceNorm.apply(x, weight, bias, eps)


class InstanceNorm(SpeedLayer, nn.GroupNorm):
    """`nn.GroupNorm(c, c, affine=True)` (same parameters, init, state dict and value) with the analytic double
    backward of `instance_norm`: the norm of the inner loop, whose second derivative every meta-gradient pays for.
    With the `instance_norm` speed layer off (raydistill.models.speed) it is nn.GroupNorm's forward."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, channels, eps=eps, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not kernel_enabled(self, "instance_norm") or under_func_transform():
            return super().forward(x)
        if x.shape[0] * x.shape[2] * x.shape[3] == 1:  # F.group_norm's own check: one value per channel and group
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        return instance_norm(x, self.weight, self.bias, self.eps)


def norm_layer(norm: str, channels: int) -> nn.Module:
    """`make_norm`, with instance norm as the `InstanceNorm` above (the same function, a cheaper double backward)."""
    return InstanceNorm(channels) if norm == "instance" else make_norm(norm, channels)


def _pool2x2(x: Tensor) -> Tensor:
    """2x2 average pooling of an NCHW tensor with even H and W: the two rows of each window are added as contiguous
    halves of a row pair, then the column pairs, then x 0.25. Five to six times faster than the CPU avg_pool2d
    kernel on 256 x 128 x 32 x 32; the same value up to the order of the four additions (float rounding)."""
    n, c, h, w = x.shape
    rows = x.contiguous().view(n, c, h // 2, 2 * w)
    pairs = (rows[..., :w] + rows[..., w:]).view(n, c, h // 2, w // 2, 2)
    return torch.add(pairs[..., 0], pairs[..., 1]).mul_(0.25)


def _unpool2x2(g: Tensor) -> Tensor:
    """The adjoint of `_pool2x2`: each input position gets 0.25 x its window's value (what avg_pool2d's backward
    computes, bit for bit), by two broadcast copies."""
    n, c, h, w = g.shape
    cols = (g * 0.25).unsqueeze(-1).expand(n, c, h, w, 2).reshape(n, c, h, 1, 2 * w)
    return cols.expand(n, c, h, 2, 2 * w).reshape(n, c, 2 * h, 2 * w)


class _AvgPool2x2(torch.autograd.Function):
    """Pooling is linear, so its backward is its adjoint (`_AvgUnpool2x2`) and the adjoint's backward is the pool
    again: derivatives of every order stay on the fast paths (the window's double backward pools and unpools)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _pool2x2(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return _AvgUnpool2x2.apply(g)


class _AvgUnpool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor) -> Tensor:
        return _unpool2x2(g)

    @staticmethod
    def backward(ctx, gg: Tensor) -> Tensor:
        return _AvgPool2x2.apply(gg)


class AvgPool2x2(SpeedLayer, nn.AvgPool2d):
    """`nn.AvgPool2d(2)` (same module type, no state) on the faster `_pool2x2` path for 4-D inputs of even size;
    other inputs (odd sizes, which the pool floors), and every input with the `avg_pool` speed layer off
    (raydistill.models.speed), go to the native kernel. `tests/unit/test_models.py` checks value and derivatives against
    avg_pool2d, and gradcheck / gradgradcheck in float64."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() == 4 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and kernel_enabled(self, "avg_pool")
                and not under_func_transform()):
            return _AvgPool2x2.apply(x)
        return super().forward(x)


class Conv2d(SpeedLayer, nn.Conv2d):
    """`nn.Conv2d` (same module type, parameters and state dict) with two CPU paths for the inner loop's shapes:

    - a 3x3 convolution with 64+ channels on a small input (an IPC 1 window's) runs by Winograd's F(2x2, 3x3)
      (`raydistill.models.winograd`): 2.25x fewer multiply-adds, the same convolution up to float rounding;
    - a single-input-channel convolution runs on ATen's im2col kernel instead of oneDNN's: for a first layer on
      grey images (Fashion-MNIST, 10 x 1 x 28 x 28 -> 32 channels, one thread) its weight gradient took 0.62 ms
      against 1.34 ms and an unrolled step's second-order pass 3.3 ms against 4.9 ms (benchmarks/README.md), the
      same convolution up to the order of the sums.

    Derivatives of every order exist on both. Other inputs (GPUs; autocast; torch.func transforms, which have no
    batching rule for either) take the native path, as does each path whose speed layer (`winograd`, `im2col`) is
    off (raydistill.models.speed). `tests/unit/test_models.py` and `tests/unit/test_winograd.py` check values and
    derivatives."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if kernel_enabled(self, "winograd") and not under_func_transform() and winograd_applies(x, self):
            return winograd_conv3x3(x, weight, bias)
        if (self.in_channels == 1 and x.device.type == "cpu" and x.dim() == 4 and self.groups == 1
                and self.padding_mode == "zeros" and not isinstance(self.padding, str) and self.dilation == (1, 1)
                and not torch.is_autocast_enabled("cpu") and kernel_enabled(self, "im2col")
                and not under_func_transform()):
            return slow_conv2d_forward(x, weight, self.kernel_size, bias, self.stride, self.padding)
        return super()._conv_forward(x, weight, bias)


class ConvNormReLU(nn.Module):
    """conv -> norm -> ReLU, the building block of the plain (non-residual) nets.

    With `conv_channels_last` set (see `set_conv_channels_last`), the convolution runs on an NHWC copy of its input
    and its output returns to NCHW: on CPU, oneDNN's NHWC convolutions (forward and both backward products) are
    faster than its NCHW ones, while the NCHW group-norm kernels are much faster than the NHWC ones. The value is
    the same; only the memory layout of the convolution changes.
    """

    conv_channels_last = False

    def __init__(self, cin: int, cout: int, kernel: int, padding: int, norm: str):
        super().__init__()
        self.conv = Conv2d(cin, cout, kernel, padding=padding, bias=True)
        self.norm = norm_layer(norm, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv_channels_last and x.dim() == 4:
            y = self.conv(x.contiguous(memory_format=torch.channels_last)).contiguous()
        else:
            y = self.conv(x)
        return F.relu(self.norm(y))


def set_conv_channels_last(model: nn.Module, enabled: bool) -> int:
    """Run every ConvNormReLU convolution of `model` in NHWC (or not); returns how many blocks it set."""
    blocks = [m for m in model.modules() if isinstance(m, ConvNormReLU)]
    for block in blocks:
        block.conv_channels_last = enabled
    return len(blocks)


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
