"""Winograd F(2x2, 3x3) convolutions (raydistill.models.winograd) and Conv2d's choice of them.

Values and derivatives of every order against F.conv2d in float64, the float32 accuracy of the convolution and of
a whole meta-gradient against float64 (absolute bounds, the same on every CPU: whichever kernel oneDNN picks for the
direct convolution is no yardstick), and which inputs take the path. Here `auto` means every speed layer (as on an
AVX2 CPU), whatever it picks on the machine.
"""

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

import raydistill.models.layers as layers
from raydistill.config import AugmentConfig
from raydistill.methods.ratbptt.config import RatBpttConfig
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient
from raydistill.models.layers import Conv2d
from raydistill.models.registry import create_model
import raydistill.models.speed as speed
from raydistill.models.speed import KERNELS, set_cpu_kernels
from raydistill.models.winograd import MAX_INPUT_ELEMENTS, winograd_applies, winograd_conv3x3

SHAPES = [(2, 2, 8, 8), (1, 3, 7, 5), (1, 2, 6, 10), (1, 1, 1, 1), (3, 2, 2, 3), (1, 4, 5, 1)]


@pytest.fixture(autouse=True)
def auto_is_all(monkeypatch):
    monkeypatch.setattr(speed, "_auto", frozenset(KERNELS))


@pytest.mark.parametrize("shape", SHAPES)
def test_value_and_every_derivative_are_the_convolutions(shape):
    """Whole tiles, odd sizes (the last tile cropped), one-pixel images; with and without a bias; gradcheck and
    gradgradcheck in float64 with respect to input, weight and bias, and a nonlinear use (the second order of
    a squared output, as the unrolled window takes it)."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, shape[1], 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(winograd_conv3x3(x, w, b), F.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(winograd_conv3x3(x, w), F.conv2d(x, w, padding=1), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(winograd_conv3x3, (x, w, b))
    assert torch.autograd.gradgradcheck(winograd_conv3x3, (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *a: winograd_conv3x3(*a) ** 2, (x, w, b))


def test_the_double_backward_is_the_convolutions():
    """The window's pattern: a create-graph gradient of the weights, then the gradient of a function of it with
    respect to the input and the weights, equal to the native convolution's to float64 rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def second(conv):
        gw = torch.autograd.grad(torch.tanh(conv(x, w)).pow(2).sum(), w, create_graph=True)[0]
        return torch.autograd.grad(gw.pow(2).sum(), (x, w))

    for ours, native in zip(second(winograd_conv3x3), second(lambda a, b: F.conv2d(a, b, padding=1))):
        assert native.abs().max() > 0
        torch.testing.assert_close(ours, native, rtol=1e-10, atol=1e-12)


def test_float32_is_accurate_against_float64():
    """At the inner loop's shape, the float32 result's largest error against float64 stays within 3e-6 of the
    output's largest value: measured 5e-7 on AVX2 and 4.6e-7 on AVX-512 (oneDNN's direct kernel: 1.3e-6 and 2.2e-7;
    F(4x4, 3x3), rejected, 8e-6). An absolute bound, not a ratio to the direct kernel, whose error depends on the
    kernel oneDNN picks for the CPU."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 128, 16, 16, generator=g, dtype=torch.float64).relu()  # post-ReLU, as the net feeds it
    w = torch.randn(128, 128, 3, 3, generator=g, dtype=torch.float64) / 30
    truth = F.conv2d(x, w, padding=1)

    def error(y):
        return ((y.double() - truth).abs().max() / truth.abs().max()).item()

    ours = error(winograd_conv3x3(x.float(), w.float()))
    assert ours < 3e-6, f"Winograd's float32 error against float64 is {ours:.2e} of the largest output"


def wide_net(dtype, kernels="auto"):
    net = create_model("convnet", 3, 4, 16, width=64, depth=2, norm="instance").to(dtype)
    set_cpu_kernels(net, kernels)
    return net


def test_the_float32_meta_gradient_is_accurate_against_float64(monkeypatch):
    """A whole RaT-BPTT meta-gradient (width 64, so the second convolution runs by Winograd) in float32 against the
    float64 truth of plain PyTorch ops (`model.cpu_kernels: none`), over 7 seeds. The float32 error of a meta-gradient
    is chaotic (a one-ulp change of the images moves the direct path's from 3e-5 to 8e-5 or 5e-4), so the bound is
    on the median over seeds: at most 1.5e-5 relative (measured on AVX2: 4.2e-6, and 4.0e-6 with the direct
    convolutions; the rejected F(4x4, 3x3) gave 5x the direct convolutions', about 2e-5)."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
    hard = torch.arange(4).repeat_interleave(2)
    real_x = torch.randn(64, 3, 16, 16, generator=g, dtype=torch.float64)
    real_y = torch.randint(0, 4, (64,), generator=g)
    cfg = RatBpttConfig(unroll=12, window=6, window_mode="fixed", fixed_start=6, inner_lr=0.01, real_batch=64)
    aug = AugmentConfig(strategies=[])
    calls = []
    monkeypatch.setattr(layers, "winograd_conv3x3", lambda *a: calls.append(1) or winograd_conv3x3(*a))

    def grad(dtype, kernels, seed):
        syn, real = SynSet(images.to(dtype), hard), RealBatch(real_x.to(dtype), real_y)
        return meta_gradient(syn, real, lambda: wide_net(dtype, kernels), cfg, aug, seed).images.double()

    errors = []
    for seed in range(7):
        calls.clear()
        truth = grad(torch.float64, "none", seed)
        assert not calls
        if seed == 0:
            torch.testing.assert_close(grad(torch.float64, "all", seed), truth, rtol=1e-9, atol=1e-12)
            assert calls
        errors.append(((grad(torch.float32, "all", seed) - truth).norm() / truth.norm()).item())
    assert calls
    assert statistics.median(errors) <= 1.5e-5, f"float32 meta-gradient errors against float64: {errors}"


def test_conv2d_takes_the_path_only_where_it_pays():
    """Eligible: CPU, 3x3, stride 1, padding 1, 64+ channels in and out, at most 2^19 input elements. Everything
    else, `model.cpu_kernels: none`, autocast and torch.func transforms take the native kernel, with the same value."""
    g = torch.Generator().manual_seed(4)
    wide = Conv2d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 8, 8, generator=g)
    assert winograd_applies(x, wide) and wide(x).grad_fn.name() == "AddBackward0"  # the bias after the transform
    assert Conv2d(64, 64, 3, padding=1, bias=False)(x).grad_fn.name() == "_OutputBackward"
    torch.testing.assert_close(wide(x), F.conv2d(x, wide.weight, wide.bias, padding=1), rtol=1e-5, atol=1e-5)
    others = [Conv2d(64, 32, 3, padding=1), Conv2d(32, 64, 3, padding=1), Conv2d(64, 64, 3, stride=2, padding=1),
              Conv2d(64, 64, 3, padding=0), Conv2d(64, 64, 5, padding=2), Conv2d(64, 64, 3, padding=1, groups=2),
              Conv2d(64, 64, 3, padding=1, dilation=2), Conv2d(64, 64, 3, padding=1, padding_mode="reflect")]
    for conv in others:
        inp = x if conv.in_channels == 64 else x[:, :32]
        assert not winograd_applies(inp, conv) and conv(inp).grad_fn.name() == "ConvolutionBackward0"
    big = torch.zeros(MAX_INPUT_ELEMENTS // (64 * 16 * 16) + 1, 64, 16, 16)
    assert not winograd_applies(big, wide)
    assert not winograd_applies(x.half(), wide)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd_applies(x, wide)
    batched = vmap(lambda a: wide(a))(x.unsqueeze(1))  # native inside transforms (no batching rule needed)
    torch.testing.assert_close(batched.squeeze(1), wide(x), rtol=1e-5, atol=1e-5)
    set_cpu_kernels(wide, "none")
    assert wide(x).grad_fn.name() == "ConvolutionBackward0"


def test_the_layer_keeps_nn_conv2d_state():
    ours, plain = Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
    plain.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Conv2d) and ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 64, 6, 6)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)
