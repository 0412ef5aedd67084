"""The meta-gradient is the derivative of the truncated unroll, for every window mode, and stays finite."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import raydistill.methods.ratbptt.inner_opt as inner_opt
from raydistill.config import AugmentConfig, MetaOptConfig
from raydistill.methods.ratbptt.config import RatBpttConfig
from raydistill.methods.ratbptt.inner_opt import InnerAdam
from raydistill.methods.base import task_seed
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient, plan_window, unrolled_meta_loss
from helpers import make_meta, named

CLASSES, IPC, SIDE = 2, 2, 6



class TinyNet(nn.Module):
    """ConvNet-1 in miniature; `fixed_init` makes weights independent of the global RNG."""

    def __init__(self, dead_param: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.GroupNorm(3, 3)
        self.head = nn.Linear(3 * (SIDE // 2) ** 2, CLASSES)
        # A parameter whose inner gradient is exactly zero: Adam's second moment stays 0 for it.
        self.dead = nn.Parameter(torch.ones(4)) if dead_param else None

    def forward(self, x):
        h = F.avg_pool2d(F.relu(self.norm(self.conv(x))), 2)
        out = self.head(h.flatten(1))
        if self.dead is not None:
            out = out + 0.0 * self.dead.sum()
        return out


def fixed_factory(dead_param=False):
    def make():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            return TinyNet(dead_param).double()

    return make


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(CLASSES * IPC, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    hard = torch.arange(CLASSES).repeat_interleave(IPC)
    real_x = torch.randn(24, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    real_y = torch.randint(0, CLASSES, (24,), generator=g)
    return images, hard, real_x, real_y


def cfg_for(mode, **kw):
    base = dict(unroll=6, window=3, window_mode=mode, fixed_start=2, inner_lr=0.05, real_batch=16)
    base.update(kw)
    return RatBpttConfig(**base)


AUG = AugmentConfig(strategies=["flip", "rotate"], rotate_degrees=15.0)


def central_difference(f, x, idx, h=1e-6):
    x_plus, x_minus = x.clone(), x.clone()
    x_plus.view(-1)[idx] += h
    x_minus.view(-1)[idx] -= h
    return (f(x_plus) - f(x_minus)) / (2 * h)


@pytest.mark.parametrize("mode", ["random", "end", "fixed", "full", "random_length"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_meta_gradient_matches_finite_differences(problem, mode, optimizer):
    images, hard, real_x, real_y = problem
    cfg = cfg_for(mode, inner_optimizer=optimizer)
    seed = 7
    result = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), fixed_factory(), cfg, AUG, seed)

    # The truncated gradient is the derivative with the prefix inputs held at the current images.
    def loss(x):
        value, _, _ = unrolled_meta_loss(SynSet(x, hard), RealBatch(real_x, real_y), fixed_factory(), cfg, AUG, seed,
                                         prefix=SynSet(images, hard))
        return value.item()

    assert result.meta_loss == pytest.approx(loss(images), rel=1e-12)
    picks = torch.randperm(images.numel(), generator=torch.Generator().manual_seed(1))[:6]
    for idx in picks.tolist():
        fd = central_difference(loss, images, idx)
        assert result.images.view(-1)[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("mode", ["random", "full"])
def test_learned_label_gradient_matches_finite_differences(problem, mode):
    images, hard, real_x, real_y = problem
    soft = F.one_hot(hard, CLASSES).double() + 0.1
    cfg = cfg_for(mode)
    result = meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), fixed_factory(), cfg, AUG, seed=3)

    def loss(y):
        value, _, _ = unrolled_meta_loss(
            SynSet(images, hard, y), RealBatch(real_x, real_y), fixed_factory(), cfg, AUG, 3,
            prefix=SynSet(images, hard, soft)
        )
        return value.item()

    for idx in range(soft.numel()):
        assert result.labels.view(-1)[idx].item() == pytest.approx(central_difference(loss, soft, idx), rel=1e-5, abs=1e-9)


def test_full_window_equals_plain_bptt(problem):
    """BPTT written out by hand (plain SGD, no augmentation, whole set each step) gives the same gradient."""
    images, hard, real_x, real_y = problem
    T, lr = 5, 0.1
    cfg = RatBpttConfig(unroll=T, window=2, window_mode="full", inner_optimizer="sgd", inner_momentum=0.0,
                        inner_lr=lr, real_batch=len(real_x))  # the whole real set: batch order is irrelevant
    result = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y),
                           fixed_factory(), cfg, AugmentConfig(strategies=[]), 11)

    x = images.clone().requires_grad_(True)
    net = fixed_factory()().double()
    params = dict(net.named_parameters())
    for _ in range(T):
        loss = F.cross_entropy(functional_call(net, params, (x,)), hard)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    meta = F.cross_entropy(functional_call(net, params, (real_x,)), real_y)
    (expected,) = torch.autograd.grad(meta, x)
    assert result.window == T and result.start == 0
    torch.testing.assert_close(result.images, expected, rtol=1e-10, atol=1e-12)


def test_prefix_sends_no_gradient_into_the_synthetic_set(problem):
    """With the window at the end, the gradient differs from full BPTT: the prefix path is cut."""
    images, hard, real_x, real_y = problem
    end = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), fixed_factory(), cfg_for("end"), AUG, 5)
    full = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), fixed_factory(), cfg_for("full"), AUG, 5)
    assert end.start == 3 and end.window == 3
    assert not torch.allclose(end.images, full.images)


def test_same_seed_same_gradient_and_windows_cover_the_unroll(problem):
    images, hard, real_x, real_y = problem
    cfg = cfg_for("random")
    a = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), fixed_factory(), cfg, AUG, 42)
    b = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), fixed_factory(), cfg, AUG, 42)
    assert torch.equal(a.images, b.images) and a.start == b.start
    starts = {plan_window(cfg, torch.Generator().manual_seed(task_seed(0, step, 0)))[0] for step in range(200)}
    assert starts == set(range(cfg.unroll - cfg.window + 1))
    lengths = {plan_window(cfg_for("random_length"), torch.Generator().manual_seed(s))[1] for s in range(200)}
    assert lengths == set(range(3, 7))


def test_synthetic_minibatches_draw_from_chosen_classes(problem):
    images, hard, real_x, real_y = problem
    cfg = cfg_for("random", batch_per_class=1, classes_per_step=1)
    result = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), fixed_factory(), cfg, AUG, 1)
    assert torch.isfinite(result.images).all()
    assert (result.images.flatten(1).abs().sum(1) > 0).any()


def test_task_seed_is_a_pure_function_of_run_step_slot():
    assert task_seed(1, 2, 3) == task_seed(1, 2, 3)
    assert len({task_seed(0, step, slot) for step in range(50) for slot in range(4)}) == 200


def test_differentiable_adam_follows_torch_adam():
    # An MLP, not TinyNet: a conv bias under instance norm has a ~0 gradient whose float noise Adam would amplify.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    ref = copy.deepcopy(net)
    torch_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = InnerAdam(lr=1e-2)
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone() for p in net.parameters()]
    state = opt.init(params)
    x, y = torch.randn(8, 1, SIDE, SIDE), torch.randint(0, CLASSES, (8,))
    for _ in range(50):
        params = [p.requires_grad_(True) for p in params]
        loss = F.cross_entropy(functional_call(net, dict(zip(names, params)), (x,)), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            params, state = opt.step(params, list(grads), state)
        torch_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        torch_opt.step()
    for mine, theirs in zip(params, ref.parameters()):
        assert (mine - theirs.detach()).abs().max() <= 1e-6


def test_meta_gradient_finite_when_an_inner_gradient_is_exactly_zero(problem, monkeypatch):
    images, hard, real_x, real_y = problem
    cfg = cfg_for("full")
    result = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), fixed_factory(dead_param=True), cfg, AUG, 9)
    assert torch.isfinite(result.images).all()
    # The guard is what keeps it finite: plain sqrt turns the same gradient NaN.
    monkeypatch.setattr(inner_opt, "safe_sqrt", torch.sqrt)
    unguarded = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y),
                              fixed_factory(dead_param=True), cfg, AUG, 9)
    assert not torch.isfinite(unguarded.images).all()


def test_safe_sqrt_value_is_exact():
    v = torch.tensor([0.0, 1e-30, 4.0])
    torch.testing.assert_close(inner_opt.safe_sqrt(v), v.sqrt())


def test_non_finite_meta_gradient_is_skipped_and_leaves_the_set_unchanged():
    images = torch.randn(4, 1, SIDE, SIDE)
    opt = make_meta(images, None, MetaOptConfig(lr=0.1))
    opt.step(named(torch.randn_like(images)))
    before = opt.tensors["images"].clone()
    state = opt.state_dict()
    bad = torch.randn_like(images)
    bad[0, 0, 0, 0] = math.nan
    report = opt.step(named(bad))
    assert not report.applied and opt.skipped == 1
    assert torch.equal(opt.tensors["images"], before)
    assert opt.updates == state["updates"] and opt.grad_norm_ema == state["grad_norm_ema"]


def test_meta_update_clips_to_twice_the_norm_ema_and_clamps_labels():
    images = torch.zeros(4, 1, SIDE, SIDE)
    labels = torch.eye(2).repeat(2, 1)
    opt = make_meta(images, labels, MetaOptConfig(lr=0.1, clip_factor=2.0, ema_decay=0.9))
    g = torch.ones_like(images)
    first = opt.step(named(g, torch.ones_like(labels)))  # positive label gradient pushes labels below 0 -> clamped
    assert first.clip_norm is None
    assert (opt.tensors["soft_labels"] >= 0).all() and (opt.tensors["soft_labels"] == 0).any()
    huge = opt.step(named(1000 * g, torch.zeros_like(labels)))
    assert huge.clip_norm == pytest.approx(2 * first.grad_norm)
    assert opt.grad_norm_ema == pytest.approx(0.9 * first.grad_norm + 0.1 * huge.clip_norm)


def test_meta_optimizer_state_round_trip():
    images = torch.randn(4, 1, SIDE, SIDE)
    a = make_meta(images, torch.eye(2).repeat(2, 1), MetaOptConfig())
    for _ in range(3):
        a.step(named(torch.randn_like(images), torch.randn(4, 2)))
    b = make_meta(torch.zeros_like(images), torch.zeros(4, 2), MetaOptConfig())
    b.load_state_dict(a.state_dict())
    g, gl = torch.randn_like(images), torch.randn(4, 2)
    a.step(named(g, gl)), b.step(named(g, gl))
    assert torch.equal(a.tensors["images"], b.tensors["images"])
    assert torch.equal(a.tensors["soft_labels"], b.tensors["soft_labels"])


def test_meta_update_is_adam_when_nothing_is_clipped():
    images = torch.randn(4, 1, SIDE, SIDE)
    reference = images.clone().requires_grad_(True)
    ours = make_meta(images, None, MetaOptConfig(lr=0.01, clip_factor=1e9))
    theirs = torch.optim.Adam([reference], lr=0.01)
    for i in range(20):
        g = torch.randn_like(images)
        g[0, 0, 0, 0] = 0.0  # an exactly-zero gradient element stays finite
        ours.step(named(g))
        reference.grad = g.clone()
        theirs.step()
    torch.testing.assert_close(ours.tensors["images"], reference.detach(), rtol=0, atol=1e-6)
