"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3), for the CPU's unrolled inner loop.

A 3x3 convolution (stride 1, padding 1) splits its output into 2x2 tiles; each tile needs a 4x4 input tile. In
Winograd's transformed domain the convolution becomes 16 independent matrix products, one per transformed
position: V (tiles x C_in) @ U (C_in x C_out), where V = B^T d B holds the transformed input tiles, U = G g G^T the
transformed filters, and the output tile is A^T M A. That is 16 multiply-adds per 4 outputs instead of 36 (2.25x
fewer), paid for by the transforms: additions and subtractions only, cheap while the transformed tensors (4x the
input) stay in the cache. It pays on the small batches of an IPC 1 window (10 x 128 x 16 x 16: a whole CIFAR-10
IPC 1 meta-step 1.13x faster); `winograd_applies` keeps larger inputs and thin layers on the native kernel. Those
limits were measured on an AVX2 CPU, so `model.cpu_kernels: auto` uses the path on AVX2 CPUs only
(raydistill.models.speed).

Every transform is linear, so each is an autograd Function whose backward is its adjoint, and the adjoint's
backward is the transform again: derivatives of every order stay on these paths (the unrolled window
differentiates each convolution twice), and the matrix products' derivatives are matrix products.

The value is the convolution's up to float rounding, as accurate as a direct kernel's in float32 (the same order
of error against float64: 5e-7 of the largest output at the inner loop's shape, where oneDNN's direct kernel gave
1.3e-6 on AVX2 and 2.2e-7 on AVX-512): the transforms' coefficients are 0, +-1 and +-1/2. The larger F(4x4, 3x3)
(four times fewer multiply-adds) was faster still but made the float32 meta-gradient about 5x less accurate against
float64 (median over seeds, benchmarks/README.md), so it is not used. `tests/unit/test_winograd.py` checks values,
derivatives (gradcheck and gradgradcheck in float64) and the float32 accuracy of the convolution and of the
meta-gradient against float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raydistill.models.speed import on_cpu

TILE, SPAN = 2, 4  # output tile side, input tile side (TILE + 3 - 1)
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # input transform (points 0, 1, -1, infinity)
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))  # filter transform
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))  # output transform
_B = tuple(zip(*_BT))
_A = tuple(zip(*_AT))

MIN_CHANNELS = 64  # below this the 16 products are too thin to pay for the transforms (32 channels: slower)
# Above this the path stops paying on the 2-core VM measured (32 MiB L3): at 100 x 128 x 8 x 8 (819 200) the
# convolution alone was 1.2x faster, but a whole IPC 10 meta-step was not (1.005x) and its peak memory rose 7 %
# (the saved transformed tensors are 4x the input); at 256 x 128 x 8 x 8 it gained 1.06x on one thread and lost
# on two (0.96x).
MAX_INPUT_ELEMENTS = 1 << 19


def winograd_applies(x: Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether `conv(x)` takes the Winograd path: a 3x3, stride 1, padding 1, ungrouped convolution of a 4-D float
    tensor on the CPU, with at least MIN_CHANNELS channels in and out and at most MAX_INPUT_ELEMENTS input elements.
    Autocast keeps the native kernel (its bf16 convolution is what the option asks for)."""
    return (on_cpu(x) and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS and x.numel() <= MAX_INPUT_ELEMENTS
            and not torch.is_autocast_enabled("cpu"))


def _combine(dsts: list[Tensor], srcs: list[Tensor], coef, accumulate: bool) -> None:
    """dsts[i] (+)= sum_j coef[i][j] srcs[j], in place, one elementwise pass per nonzero coefficient."""
    for dst, row in zip(dsts, coef):
        fresh = not accumulate
        for src, c in zip(srcs, row):
            if c == 0:
                continue
            if fresh and c == 1:
                dst.copy_(src)
            elif fresh:
                torch.mul(src, c, out=dst)
            else:
                dst.add_(src, alpha=c)
            fresh = False
        if fresh:
            dst.zero_()


def _phases(t: Tensor, tiles: int) -> list[Tensor]:
    """The SPAN positions of every overlapping input tile along one axis, as strided views. `t` is (..., tiles + 1,
    TILE, inner): position TILE j + s (tile j's s-th) is phase s % TILE of block j + s // TILE, so the s-th element
    of every tile is one slice whose inner block stays contiguous (the elementwise passes vectorize over it)."""
    return [t[..., s // TILE: s // TILE + tiles, s % TILE, :] for s in range(SPAN)]


def _tiles(h: int, w: int) -> tuple[int, int]:
    return -(-h // TILE), -(-w // TILE)


def _input_transform(x: Tensor) -> Tensor:
    """x (N, C, H, W) -> V (SPAN, SPAN, N * TH, TW, C): B^T d B for every input tile of the zero-padded input."""
    n, c, h, w = x.shape
    th, tw = _tiles(h, w)
    hp, wp = TILE * (th + 1), TILE * (tw + 1)
    padded = x.new_zeros(n, hp, wp, c)  # NHWC, the padding of 1 plus zeros up to whole tiles
    padded[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
    rows = x.new_empty(SPAN, n, th, wp * c)
    _combine(list(rows), _phases(padded.view(n, th + 1, TILE, wp * c), th), _BT, accumulate=False)
    v = x.new_empty(SPAN, SPAN, n * th, tw, c)
    _combine([v[:, j] for j in range(SPAN)], _phases(rows.view(SPAN, n * th, tw + 1, TILE, c), tw), _BT,
             accumulate=False)
    return v


def _input_adjoint(v: Tensor, shape: torch.Size) -> Tensor:
    """The adjoint of `_input_transform`: overlapping tiles add up (B d B^T, scattered back), padding dropped."""
    n, c, h, w = shape
    th, tw = _tiles(h, w)
    hp, wp = TILE * (th + 1), TILE * (tw + 1)
    rows = v.new_zeros(SPAN, n * th, tw + 1, TILE, c)
    _combine(_phases(rows, tw), [v[:, j] for j in range(SPAN)], _B, accumulate=True)
    padded = v.new_zeros(n, th + 1, TILE, wp * c)
    _combine(_phases(padded, th), list(rows.view(SPAN, n, th, wp * c)), _B, accumulate=True)
    return padded.view(n, hp, wp, c)[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2).contiguous()


def _output_transform(m: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """M (SPAN, SPAN, N * TH, TW, K) -> y (N, K, H, W): A^T m A for every tile, cropped to the output's size."""
    n, k, h, w = shape
    th, tw = _tiles(h, w)
    cols = m.new_empty(TILE, SPAN, n * th, tw, k)
    _combine(list(cols), list(m), _AT, accumulate=False)
    y = m.new_empty(n * th, TILE, tw, TILE, k)  # NHWC with H = (th, TILE) and W = (tw, TILE)
    by_row = y.permute(1, 0, 2, 3, 4)
    _combine([by_row[..., u, :] for u in range(TILE)], [cols[:, j] for j in range(SPAN)], _AT, accumulate=False)
    return y.view(n, th * TILE, tw * TILE, k)[:, :h, :w].permute(0, 3, 1, 2).contiguous()


def _output_adjoint(gy: Tensor) -> Tensor:
    """The adjoint of `_output_transform`: A g A^T for every (zero-extended) output tile."""
    n, k, h, w = gy.shape
    th, tw = _tiles(h, w)
    if th * TILE == h and tw * TILE == w:
        y = gy.permute(0, 2, 3, 1).contiguous()
    else:
        y = gy.new_zeros(n, th * TILE, tw * TILE, k)
        y[:, :h, :w].copy_(gy.permute(0, 2, 3, 1))
    by_row = y.view(n * th, TILE, tw, TILE, k).permute(1, 0, 2, 3, 4)
    cols = gy.new_empty(TILE, SPAN, n * th, tw, k)
    _combine([cols[:, j] for j in range(SPAN)], [by_row[..., u, :] for u in range(TILE)], _A, accumulate=False)
    m = gy.new_empty(SPAN, SPAN, n * th, tw, k)
    _combine(list(m), list(cols), _A, accumulate=False)
    return m


class _Input(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return _input_transform(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return _InputAdjoint.apply(g, ctx.shape)


class _InputAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, shape: torch.Size) -> Tensor:
        return _input_adjoint(v, shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _Input.apply(g), None


class _Output(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
        return _output_transform(m, shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _OutputAdjoint.apply(g), None


class _OutputAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy: Tensor) -> Tensor:
        ctx.shape = tuple(gy.shape)
        return _output_adjoint(gy)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return _Output.apply(g, ctx.shape)


_FILTER_TRANSFORMS: dict[tuple, Tensor] = {}


def _filter_transform(like: Tensor) -> Tensor:
    """G (x) G as a (16, 9) matrix: U = G g G^T for every filter in one matrix product."""
    key = (like.dtype, like.device)
    if key not in _FILTER_TRANSFORMS:
        g = torch.tensor(_G, dtype=torch.float64)
        _FILTER_TRANSFORMS[key] = torch.kron(g, g).to(device=like.device, dtype=like.dtype)
    return _FILTER_TRANSFORMS[key]


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for a (K, C, 3, 3) weight, by F(2x2, 3x3) (module docstring)."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = _tiles(h, w)
    u = (_filter_transform(weight) @ weight.permute(2, 3, 1, 0).reshape(9, c * k)).view(SPAN * SPAN, c, k)
    v = _Input.apply(x).view(SPAN * SPAN, n * th * tw, c)
    y = _Output.apply(torch.bmm(v, u).view(SPAN, SPAN, n * th, tw, k), (n, k, h, w))
    return y if bias is None else y + bias.view(1, -1, 1, 1)
