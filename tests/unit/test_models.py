"""Model registry, shapes, features, norm choices, reproducible init and double backward under functional_call;
the CPU speed layers and their switch (`model.cpu_kernels`, raydistill.models.speed).

In the layer tests `auto` means every speed layer (as on an AVX2 CPU), whatever it picks on the machine.
"""

import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

import raydistill.models.layers as layers
import raydistill.models.speed as speed
from raydistill.config import AugmentConfig, ConfigError, DistillConfig
from raydistill.config.schema import CPU_KERNELS
from raydistill.config.validate import validate
from raydistill.methods.ratbptt.config import RatBpttConfig
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient
from raydistill.models.layers import AvgPool2x2, Conv2d, InstanceNorm, instance_norm, set_conv_channels_last
from raydistill.models.losses import soft_cross_entropy
from raydistill.models.registry import MODELS, build_network, create_model
from raydistill.models.speed import KERNELS, SpeedLayer, auto_kernels, kernel_enabled, resolve, set_cpu_kernels

SHAPES = [(1, 28), (3, 32), (3, 64)]  # (channels, size): Fashion-MNIST, CIFAR, Tiny-ImageNet-like


@pytest.fixture(autouse=True)
def auto_is_all(monkeypatch):
    monkeypatch.setattr(speed, "_auto", frozenset(KERNELS))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size", SHAPES)
def test_logits_shape(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, channels, 10, size, width=16)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size", SHAPES[:2])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_forward_is_the_head_of_the_features(name, channels, size, norm):
    torch.manual_seed(0)
    model = create_model(name, channels, 10, size, width=8, norm=norm).eval()
    x = torch.randn(3, channels, size, size)
    features = model.features(x)
    assert features.shape == (3, model.head.in_features)  # flat, and exactly what the head reads
    assert torch.equal(model(x), model.head(features))


@pytest.mark.parametrize("channels,size,dim", [(1, 28, 8 * 3 * 3), (3, 32, 8 * 4 * 4)])
def test_feature_widths_follow_the_architecture(channels, size, dim):
    x = torch.randn(2, channels, size, size)
    assert create_model("convnet", channels, 10, size, width=8).features(x).shape == (2, dim)
    assert create_model("alexnet", channels, 10, size).features(x).shape == (2, 192 * (size // 8) ** 2)
    assert create_model("vgg11", channels, 10, size).features(x).shape == (2, 512)
    assert create_model("resnet18", channels, 10, size).features(x).shape == (2, 512)


def test_soft_cross_entropy_matches_cross_entropy_on_one_hot_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    hard = soft_cross_entropy(logits, y)
    assert torch.allclose(soft_cross_entropy(logits, nn.functional.one_hot(y, 4).float()), hard)
    assert torch.equal(hard, nn.functional.cross_entropy(logits, y))


def test_convnet_depth4_at_64():
    model = create_model("convnet", 3, 7, 64, width=8, depth=4)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert model.head.in_features == 8 * 4 * 4


def test_convnet_depth3_at_28_has_3x3_map():
    assert create_model("convnet", 1, 10, 28, width=8).head.in_features == 8 * 3 * 3


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        create_model("lenet9000", 3, 10, 32)
    message = str(info.value)
    assert "\n" not in message and "lenet9000" in message
    assert all(name in message for name in MODELS)


def test_unknown_norm_and_too_deep_convnet():
    with pytest.raises(ConfigError, match="model.norm"):
        create_model("convnet", 3, 10, 32, norm="layer")
    with pytest.raises(ConfigError, match="model.depth"):
        create_model("convnet", 1, 10, 28, depth=5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_norm_option_picks_modules(name):
    def kinds(norm):
        model = create_model(name, 3, 10, 32, width=8, norm=norm)
        return {base for m in model.modules() for base in type(m).__mro__}  # InstanceNorm counts as a GroupNorm

    assert nn.GroupNorm in kinds("instance") and nn.BatchNorm2d not in kinds("instance")
    assert nn.BatchNorm2d in kinds("batch") and nn.GroupNorm not in kinds("batch")
    assert nn.GroupNorm not in kinds("none") and nn.BatchNorm2d not in kinds("none")


def test_instance_norm_is_one_group_per_channel():
    model = create_model("convnet", 3, 10, 32, width=8)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 8 and m.affine for m in norms)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_init_reproducible_under_seed(name):
    def build():
        torch.manual_seed(123)
        return create_model(name, 3, 10, 32, width=8)

    a, b = build().state_dict(), build().state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(124)
    c = create_model(name, 3, 10, 32, width=8).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _double_backward(name, norm, channels=1, size=28, **kw):
    """d/dx of ||d loss / d params||^2, with params passed through functional_call in float64."""
    torch.manual_seed(0)
    model = create_model(name, channels, 10, size, norm=norm, **kw).double()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    x = torch.randn(4, channels, size, size, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    meta = sum((g * g).sum() for g in grads)  # depends on x only through the parameter gradients
    (gx,) = torch.autograd.grad(meta, x)
    assert gx.shape == x.shape and gx.dtype == torch.float64
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_convnet_double_backward_float64(norm):
    _double_backward("convnet", norm, width=8)


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "resnet18"])
def test_other_models_double_backward_float64(name):
    _double_backward(name, "instance", channels=3, size=16 if name == "alexnet" else 8)


def test_convnet_gradcheck_hessian_vector():
    """A numerically checked second derivative through functional_call, on a tiny ConvNet."""
    torch.manual_seed(0)
    model = create_model("convnet", 1, 3, 8, width=2, depth=2).double()
    names = [k for k, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    head_w = names.index("head.weight")

    def grad_of_head(x):
        ps = [p.requires_grad_(True) for p in params]
        out = functional_call(model, dict(zip(names, ps)), (x,))
        (g,) = torch.autograd.grad(out.logsumexp(1).sum(), [ps[head_w]], create_graph=True)
        return g

    assert torch.autograd.gradcheck(grad_of_head, (x,))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_instance_norm_first_and_second_derivatives_match_finite_differences(layout):
    """The analytic backward and double backward of the fused instance norm, by gradcheck and gradgradcheck."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) + 1).contiguous(memory_format=layout)
    weight = torch.randn(4, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (x, weight, bias))
    assert torch.autograd.gradcheck(instance_norm, inputs)
    assert torch.autograd.gradgradcheck(instance_norm, inputs)
    # The double backward on its own inputs, including a large eps (where <xhat^2> is far from 1).
    assert torch.autograd.gradgradcheck(lambda a, b, c: instance_norm(a, b, c, eps=0.5), inputs)


def test_instance_norm_module_is_group_norm_with_one_channel_per_group():
    torch.manual_seed(0)
    ours, plain = InstanceNorm(6), nn.GroupNorm(6, 6)
    with torch.no_grad():
        for p in (*ours.parameters(), *plain.parameters()):
            p.copy_(torch.randn_like(p))
    plain.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(4, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    ours, plain = ours.double(), plain.double()
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-12, atol=1e-12)
    # First and second derivatives agree with autograd's own group norm.
    def second(norm):
        out = norm(x)
        grads = torch.autograd.grad((out.sin() * out).sum(), [x, *norm.parameters()], create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in grads), [x, *norm.parameters()])

    for a, b in zip(second(ours), second(plain)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert isinstance(create_model("convnet", 3, 10, 32, width=8).body[0][0].norm, InstanceNorm)


@pytest.mark.parametrize("name", ["convnet", "alexnet"])
def test_channels_last_convolutions_change_nothing_but_the_layout(name):
    """Value, gradient and double-backward gradient with NHWC convolutions equal the NCHW ones (float64)."""
    torch.manual_seed(0)
    model = create_model(name, 3, 4, 16, width=6).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    params = dict(model.named_parameters())

    def run():
        out = functional_call(model, params, (x,))
        grads = torch.autograd.grad(out.logsumexp(1).sum(), list(params.values()), create_graph=True)
        (gx,) = torch.autograd.grad(sum((g * g).sum() for g in grads), x)
        return out, gx

    assert set_conv_channels_last(model, False) > 0
    plain = run()
    assert set_conv_channels_last(model, True) > 0
    nhwc = run()
    for a, b in zip(plain, nhwc):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fast_average_pool_is_avg_pool2d_with_every_derivative():
    """AvgPool2x2: the value of nn.AvgPool2d(2) up to the order of four additions, its backward bit for bit, and
    first and second derivatives by gradcheck / gradgradcheck in float64; odd sizes and other layouts included."""
    pool, native = AvgPool2x2(), nn.AvgPool2d(2)
    assert isinstance(pool, nn.AvgPool2d) and pool.state_dict() == {}
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5, 8, 6), (2, 4, 7, 7), (1, 2, 32, 32)]:  # even, odd (the native path), square
        x = torch.randn(*shape, generator=g, requires_grad=True)
        y, ref = pool(x), native(x)
        assert y.shape == ref.shape and torch.allclose(y, ref, rtol=0, atol=1e-6)
        gy = torch.randn(ref.shape, generator=g)
        assert torch.equal(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ref, x, gy)[0])
    channels_last = torch.randn(2, 3, 4, 6, generator=g).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(pool(channels_last), native(channels_last), rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(lambda a: pool(a) ** 2, (x,))  # a nonlinear use: the second order matters


def test_single_channel_convolution_is_conv2d_with_every_derivative():
    """Conv2d: nn.Conv2d's parameters and value; one input channel on the CPU runs ATen's im2col kernel (its
    backward node says so), first and second derivatives by gradcheck / gradgradcheck in float64, with respect to the
    input and the parameters; more channels, and vmap, take the native path."""
    g = torch.Generator().manual_seed(0)
    for cin, kernel, stride, padding, path in [(1, 3, 1, 1, "SlowConv2DBackward0"), (1, 3, 2, 0, "SlowConv2DBackward0"),
                                                (3, 3, 1, 1, "ConvolutionBackward0")]:
        ours = Conv2d(cin, 4, kernel, stride=stride, padding=padding).double()
        plain = nn.Conv2d(cin, 4, kernel, stride=stride, padding=padding).double()
        plain.load_state_dict(ours.state_dict())
        assert isinstance(ours, nn.Conv2d) and ours.state_dict().keys() == plain.state_dict().keys()
        x = torch.randn(2, cin, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
        y = ours(x)
        assert y.grad_fn.name() == path
        torch.testing.assert_close(y, plain(x), rtol=1e-12, atol=1e-12)
        w, b = (ours.weight.detach().clone().requires_grad_(True), ours.bias.detach().clone().requires_grad_(True))

        def f(w, b, x):
            return functional_call(ours, {"weight": w, "bias": b}, (x,)) ** 2

        assert torch.autograd.gradcheck(f, (w, b, x))
        assert torch.autograd.gradgradcheck(f, (w, b, x))
    x32 = torch.randn(3, 1, 8, 8, generator=g)
    conv = Conv2d(1, 5, 3, padding=1)
    torch.testing.assert_close(conv(x32), nn.functional.conv2d(x32, conv.weight, conv.bias, padding=1))
    batched = vmap(lambda a: conv(a))(x32.unsqueeze(1))  # native inside transforms: no batching rule needed
    torch.testing.assert_close(batched.squeeze(1), conv(x32))


def test_the_fast_layers_run_inside_torch_func_transforms():
    """Several samples per task run the layers under vmap(grad(.)) with autograd outside. Their custom Functions have
    no functorch rules, so there the modules run the native ops: the same values and derivatives (first inside the
    transforms, second outside) as nn.GroupNorm and nn.AvgPool2d, and no error."""
    g = torch.Generator().manual_seed(0)
    k, shape = 3, (2, 4, 6, 6)
    x = torch.randn(k, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(k, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(k, 4, generator=g, dtype=torch.float64)
    t = torch.randn(k, 2, 4, 3, 3, generator=g, dtype=torch.float64)
    ours = nn.Sequential(InstanceNorm(4), AvgPool2x2()).double()
    native = nn.Sequential(nn.GroupNorm(4, 4), nn.AvgPool2d(2)).double()

    def loss(net):
        def f(ww, xx, bb, tt):
            out = functional_call(net, {"0.weight": ww, "0.bias": bb}, (xx,))
            return ((out.relu() * tt) ** 2).sum()
        return f

    inner = [vmap(grad(loss(net), argnums=(0, 1)))(w, x, b, t) for net in (ours, native)]
    for a, c in zip(*inner):
        assert a.abs().max() > 0 and torch.allclose(a, c, rtol=1e-10, atol=1e-12)
    outer = [torch.autograd.grad(sum(d.pow(2).sum() for d in grads), (x, w)) for grads in inner]
    for a, c in zip(*outer):
        assert a.abs().max() > 0 and torch.allclose(a, c, rtol=1e-9, atol=1e-11)
    with pytest.raises(RuntimeError, match="setup_context"):  # the control: the Function itself has no rule
        vmap(instance_norm)(x, w, b)


# ---------------------------------------------------------------------------------- the switch: model.cpu_kernels


def spy_on_speed_layers(monkeypatch) -> dict[str, int]:
    """How often each speed layer ran (KERNELS' names), from spies on the functions the layers call."""
    counts = dict.fromkeys(KERNELS, 0)

    def spy(kernel, fn):
        def counted(*args, **kwargs):
            counts[kernel] += 1
            return fn(*args, **kwargs)
        return counted

    for kernel, name in [("winograd", "winograd_conv3x3"), ("im2col", "slow_conv2d_forward"),
                         ("instance_norm", "instance_norm"), ("avg_pool", "_pool2x2")]:
        monkeypatch.setattr(layers, name, spy(kernel, getattr(layers, name)))
    return counts


def plain_copy(model: nn.Module) -> nn.Module:
    """`model` with raydistill's layers swapped for the torch modules they subclass, holding the same state."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, Conv2d):
            swap = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, module.dilation, module.groups, module.bias is not None,
                             module.padding_mode)
        elif isinstance(module, InstanceNorm):
            swap = nn.GroupNorm(module.num_groups, module.num_channels, module.eps, module.affine)
        elif isinstance(module, AvgPool2x2):
            swap = nn.AvgPool2d(2)
        else:
            continue
        swap.load_state_dict(module.state_dict())
        parent, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, attr, swap)
    return plain


def graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo.extend(n for n, _ in node.next_functions)
    return names


def speed_net(dtype=torch.float32, kernels="auto") -> nn.Module:
    """A net on which every speed layer applies: one input channel (im2col), width 64 on 8 x 8 (Winograd), the
    instance norm and even-sized pools."""
    net = create_model("convnet", 1, 4, 16, width=64, depth=2, norm="instance").to(dtype)
    assert set_cpu_kernels(net, kernels) == 6  # two convolutions, two norms, two pools
    return net


def test_none_runs_the_plain_torch_ops(monkeypatch):
    """`none`: the layers run exactly the ops of nn.Conv2d, nn.GroupNorm and nn.AvgPool2d (the same autograd graph
    and the same value, bit for bit); `all` runs every speed layer on the same net (the control)."""
    counts = spy_on_speed_layers(monkeypatch)
    torch.manual_seed(0)
    net = speed_net(kernels="none")
    plain = plain_copy(net)
    x = torch.randn(8, 1, 16, 16, requires_grad=True)
    reference, y = plain(x), net(x)
    assert not any(counts.values())
    assert torch.equal(y, reference) and graph_nodes(y) == graph_nodes(reference)
    set_cpu_kernels(net, "all")
    fast = net(x)
    assert all(counts.values()), counts
    assert graph_nodes(fast) != graph_nodes(reference)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_and_none_give_the_same_meta_gradient(monkeypatch, dtype):
    """A short RaT-BPTT meta-gradient on a net where every speed layer applies: the same with all of them as with
    plain PyTorch ops, to float64 rounding (and float32's: a short window is not chaotic)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64).to(dtype)
    hard = torch.arange(4)
    real_x = torch.randn(32, 1, 16, 16, generator=g, dtype=torch.float64).to(dtype)
    real_y = torch.randint(0, 4, (32,), generator=g)
    cfg = RatBpttConfig(unroll=4, window=2, window_mode="fixed", fixed_start=2, inner_lr=0.01, real_batch=32)
    counts = spy_on_speed_layers(monkeypatch)

    def run(kernels):
        return meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), lambda: speed_net(dtype, kernels), cfg,
                             AugmentConfig(strategies=[]), 7)

    plain = run("none")
    assert not any(counts.values())
    fast = run("all")
    assert all(counts.values()), counts
    assert plain.images.abs().max() > 0
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fast.images, plain.images, rtol=tol, atol=tol * plain.images.abs().max().item())
    assert fast.meta_loss == pytest.approx(plain.meta_loss, rel=tol)


def test_the_switch_is_one_setting():
    """`model.cpu_kernels`, checked by the config's validation, reaches every speed layer of a network built from
    the config (build_network: the workers', validator's and evaluation's networks); each speed path of the layers
    asks it, and nothing else switches them (Conv2d has no switch of its own)."""
    assert speed.CPU_KERNELS is CPU_KERNELS and DistillConfig().model.cpu_kernels == "auto"
    cfg = DistillConfig()
    for bad in ("on", "off", True):
        cfg.model.cpu_kernels = bad
        with pytest.raises(ConfigError, match="model.cpu_kernels"):
            validate(cfg)
        with pytest.raises(ValueError, match="model.cpu_kernels"):
            resolve(bad)
    for mode, kernels in (("all", set(KERNELS)), ("none", set()), ("auto", auto_kernels(speed.cpu_capability()))):
        cfg.model.cpu_kernels = mode
        validate(cfg)
        net = build_network("convnet", cfg.model, (1, 16, 16), 4)
        layers_ = [m for m in net.modules() if isinstance(m, SpeedLayer)]
        assert len(layers_) == 3 * cfg.model.depth
        assert all(m.cpu_kernels == kernels for m in layers_), mode
        assert {k for k in KERNELS if kernel_enabled(layers_[0], k)} == kernels
    assert not hasattr(Conv2d, "winograd")
    source = open(layers.__file__).read()
    for kernel in KERNELS:
        assert source.count(f'kernel_enabled(self, "{kernel}")') == 1, kernel
    assert source.count("kernel_enabled(") == len(KERNELS)  # no other call decides


def test_auto_decides_from_the_cpu_capability(monkeypatch):
    """auto: every speed layer on AVX2 (where they were measured: the same as `all`, bit for bit); elsewhere only
    the ISA-independent ones (the instance norm's double backward and the pool). The layers follow."""
    assert auto_kernels("AVX2") == frozenset(KERNELS) == resolve("all")
    for capability in ("AVX512", "DEFAULT", "SVE256", "VSX", "ZVECTOR", "NO AVX"):
        assert auto_kernels(capability) == {"instance_norm", "avg_pool"}, capability
    assert resolve("auto") == auto_kernels(torch.backends.cpu.get_cpu_capability())  # this machine
    counts = spy_on_speed_layers(monkeypatch)
    x = torch.randn(8, 1, 16, 16)
    for capability, ran in (("AVX512", {"instance_norm", "avg_pool"}), ("AVX2", set(KERNELS))):
        monkeypatch.setattr(speed, "cpu_capability", lambda capability=capability: capability)
        counts.update(dict.fromkeys(KERNELS, 0))
        speed_net(kernels="auto")(x)
        assert {k for k, n in counts.items() if n} == ran, capability
        monkeypatch.setattr(speed, "_auto", None)  # a network never told: auto, decided once per process
        counts.update(dict.fromkeys(KERNELS, 0))
        create_model("convnet", 1, 4, 16, width=64, depth=2)(x)
        assert {k for k, n in counts.items() if n} == ran, capability
