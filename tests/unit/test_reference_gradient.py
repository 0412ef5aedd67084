"""raydistill's meta-gradient equals the official algorithm's (helpers/reference_higher.py, built on `higher`).

The reference trains the plain network (nn.GroupNorm, NCHW) with torch.optim.Adam, back-propagates every prefix step
into the synthetic images and discards that gradient, and unrolls the window under higher's monkeypatched module and
differentiable Adam; raydistill runs a graph-free prefix, its own functional Adam, the analytic instance-norm double
backward and (optionally) the channels-last layout. Same seeds, float64: the gradients must agree to 1e-5 relative.
"""

import copy
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raydistill.config import AugmentConfig
from raydistill.methods.ratbptt.config import RatBpttConfig
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient
import raydistill.models.layers as layers
from raydistill.models.layers import Conv2d, InstanceNorm
from raydistill.models.registry import create_model
from raydistill.models.speed import set_cpu_kernels
from raydistill.models.winograd import winograd_conv3x3

import higher  # noqa: E402,F401  (the test extra installs it; a missing reference must fail here, not skip)
from helpers.reference_higher import official_network, reference_meta_gradient  # noqa: E402

CLASSES, IPC, SIDE = 3, 2, 8


def factory(channels: int = 3, width: int = 6):
    return create_model("convnet", channels, CLASSES, SIDE, width=width, depth=2, norm="instance").double()


def make_problem(channels: int):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(CLASSES * IPC, channels, SIDE, SIDE, generator=g, dtype=torch.float64)
    hard = torch.arange(CLASSES).repeat_interleave(IPC)
    real_x = torch.randn(40, channels, SIDE, SIDE, generator=g, dtype=torch.float64)
    real_y = torch.randint(0, CLASSES, (40,), generator=g)
    return images, hard, real_x, real_y


@pytest.fixture
def problem():
    return make_problem(3)


def relative_error(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


CASES = {
    "fixed window, whole set, no augmentation": (
        RatBpttConfig(unroll=7, window=4, window_mode="fixed", fixed_start=3, inner_lr=0.01, real_batch=16),
        AugmentConfig(strategies=[]), False),
    "random window, minibatches, augmentation, learned labels": (
        RatBpttConfig(unroll=6, window=3, window_mode="random", inner_lr=0.01, real_batch=16, batch_per_class=1,
                      classes_per_step=2),
        AugmentConfig(strategies=["flip", "rotate", "crop"]), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("channels", [3, 1])  # 1: raydistill's first convolution runs ATen's im2col kernel
def test_meta_gradient_equals_the_higher_reference(case, channels_last, channels):
    images, hard, real_x, real_y = make_problem(channels)
    net = partial(factory, channels)
    cfg, aug, learn_labels = CASES[case]
    cfg = replace(cfg, channels_last=channels_last)
    soft = F.one_hot(hard, CLASSES).double() * 2.0 + 0.1 if learn_labels else None
    assert any(isinstance(m, InstanceNorm) for m in net().modules())  # raydistill's side runs the fused norm
    assert type(net().body[0][0].conv) is Conv2d
    for seed in (3, 11):
        ours = meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), net, cfg, aug, seed)
        ref_images, ref_labels, ref_loss = reference_meta_gradient(images, hard, soft, real_x, real_y, net,
                                                                   cfg, aug, seed)
        assert ours.meta_loss == pytest.approx(ref_loss, rel=1e-10)
        assert ref_images.abs().max() > 0
        assert relative_error(ours.images, ref_images) < 1e-5
        torch.testing.assert_close(ours.images, ref_images, rtol=1e-5, atol=1e-5 * ref_images.abs().max().item())
        if learn_labels:
            assert relative_error(ours.labels, ref_labels) < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_gradient_with_winograd_convolutions_equals_the_higher_reference(case, monkeypatch):
    """Width 64: raydistill's second convolution runs by Winograd F(2x2, 3x3) (raydistill.models.winograd), the
    reference's by the plain convolution; the gradients still agree to 1e-5 relative."""
    images, hard, real_x, real_y = make_problem(3)
    net = partial(factory, 3, 64)
    cfg, aug, learn_labels = CASES[case]
    soft = F.one_hot(hard, CLASSES).double() * 2.0 + 0.1 if learn_labels else None
    calls = []
    monkeypatch.setattr(layers, "winograd_conv3x3", lambda *a: calls.append(1) or winograd_conv3x3(*a))

    def with_winograd():  # on every CPU: `auto` keeps Winograd for AVX2 machines only
        model = net()
        set_cpu_kernels(model, "all")
        return model

    ours = meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), with_winograd, cfg, aug, 3)
    assert calls
    calls.clear()
    ref_images, ref_labels, ref_loss = reference_meta_gradient(images, hard, soft, real_x, real_y, net, cfg, aug, 3)
    assert not calls
    assert ours.meta_loss == pytest.approx(ref_loss, rel=1e-10)
    assert ref_images.abs().max() > 0 and relative_error(ours.images, ref_images) < 1e-5
    if learn_labels:
        assert relative_error(ours.labels, ref_labels) < 1e-5


def test_reference_prefix_reaches_the_synthetic_set_and_is_discarded(problem):
    """The reference pays for the prefix's backward into the images, yet its gradient is the truncated one: a
    longer prefix with the same window changes the gradient only through the network it trains."""
    images, hard, real_x, real_y = problem
    cfg = RatBpttConfig(unroll=7, window=4, window_mode="fixed", fixed_start=3, inner_lr=0.01, real_batch=16)
    calls = []
    original = torch.Tensor.backward

    def spy(tensor, *args, **kwargs):
        calls.append(tensor)
        return original(tensor, *args, **kwargs)

    torch.Tensor.backward = spy
    try:
        ref, _, _ = reference_meta_gradient(images, hard, None, real_x, real_y, factory, cfg, AugmentConfig(strategies=[]), 5)
    finally:
        torch.Tensor.backward = original
    assert len(calls) == cfg.fixed_start + 1  # one backward per prefix step, and the meta-loss's
    ours = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), factory, cfg, AugmentConfig(strategies=[]), 5)
    assert relative_error(ours.images, ref) < 1e-5


def test_the_reference_trains_the_plain_torch_layers():
    """official_network swaps each of raydistill's layer subclasses back to the torch layer it replaces, with the
    same parameters: the reference pays for what the official code runs."""
    ours = factory(1)
    net = official_network(copy.deepcopy(ours))
    kinds = {type(m) for m in net.modules()}
    assert {nn.Conv2d, nn.GroupNorm, nn.AvgPool2d} <= kinds
    assert not [t for t in kinds if t not in (nn.Conv2d, nn.GroupNorm, nn.AvgPool2d)
                and issubclass(t, (nn.Conv2d, nn.GroupNorm, nn.AvgPool2d))]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), net.state_dict().values()))
