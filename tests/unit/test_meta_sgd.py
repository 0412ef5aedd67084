"""Specification of the SGD-with-momentum meta-optimizer (meta.optimizer=sgd): torch.optim.SGD's arithmetic, the
same per-learnable and per-example learning rates, clipping and skipping as Adam, and exact checkpoint resumes."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_meta, named

from raydistill.config import ConfigError, MetaOptConfig
from raydistill.setup import load_config
from raydistill.storage.checkpoint import arrays_to_state, load_checkpoint, save_checkpoint, state_to_arrays
from raydistill.methods.base import Learnable
from raydistill.synset.meta_update import MetaOptimizer

SIDE = 5


def sgd(lr: float = 0.1, momentum: float = 0.5, clip_factor: float = 0.0, **kw) -> MetaOptConfig:
    return MetaOptConfig(optimizer="sgd", lr=lr, momentum=momentum, clip_factor=clip_factor, **kw)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_sgd_is_torch_sgd_over_several_steps(momentum):
    images = torch.randn(4, 1, SIDE, SIDE)
    reference = images.clone().requires_grad_(True)
    ours = make_meta(images, None, sgd(lr=0.1, momentum=momentum))
    theirs = torch.optim.SGD([reference], lr=0.1, momentum=momentum, dampening=0, nesterov=False)
    for _ in range(10):
        g = torch.randn_like(images)
        report = ours.step(named(g))
        reference.grad = g.clone()
        theirs.step()
        assert report.applied and report.clip_norm is None  # clip_factor 0: never clipped
    torch.testing.assert_close(ours.tensors["images"], reference.detach(), rtol=0, atol=1e-6)


def test_momentum_buffer_is_the_gradient_then_accumulates():
    images = torch.zeros(2, 1, SIDE, SIDE)
    opt = make_meta(images, None, sgd(lr=1.0, momentum=0.5))
    g = torch.ones_like(images)
    opt.step(named(g))
    assert torch.equal(opt.tensors["images"], -g)  # first step: buf = g
    opt.step(named(g))
    assert torch.equal(opt.tensors["images"], -g - 1.5 * g)  # then buf = 0.5 * g + g


def test_sgd_honours_each_learnables_lr_scale_and_clamp():
    images, labels = torch.zeros(4, 1, SIDE, SIDE), torch.eye(2).repeat(2, 1)
    opt = make_meta(images, labels, sgd(lr=0.1, label_lr_scale=3.0))
    g, gl = torch.ones_like(images), torch.full((4, 2), 2.0)
    opt.step(named(g, gl))
    torch.testing.assert_close(opt.tensors["images"], -0.1 * g)
    # labels step at 0.1 x 3: 1 - 0.6 = 0.4 and 0 - 0.6 clamped to 0
    torch.testing.assert_close(opt.tensors["soft_labels"], 0.4 * torch.eye(2).repeat(2, 1))


def test_zero_example_lr_scale_leaves_those_rows_bit_identical():
    images, labels = torch.randn(6, 1, 4, 4), torch.eye(2).repeat(3, 1)
    scale = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5, 1.0])
    specs = {"images": Learnable(), "soft_labels": Learnable(clamp_min=0.0)}
    opt = MetaOptimizer({"images": images, "soft_labels": labels}, specs, sgd(), example_lr_scale=scale)
    reference = images.clone().requires_grad_(True)
    theirs = torch.optim.SGD([reference], lr=0.1, momentum=0.5)
    for _ in range(5):
        g = torch.randn_like(images)
        opt.step({"images": g, "soft_labels": torch.randn(6, 2)})
        reference.grad = g.clone()
        theirs.step()
    assert torch.equal(opt.tensors["images"][:3], images[:3])
    assert torch.equal(opt.tensors["soft_labels"][:3], labels[:3])
    # The others move: at full rate like torch's SGD, at half rate by half as far.
    torch.testing.assert_close(opt.tensors["images"][[3, 5]], reference.detach()[[3, 5]], rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.tensors["images"][4] - images[4], 0.5 * (reference.detach()[4] - images[4]))


def test_a_non_finite_gradient_is_dropped_momentum_included():
    images = torch.randn(4, 1, SIDE, SIDE)
    opt = make_meta(images, None, sgd())
    opt.step(named(torch.randn_like(images)))
    before = opt.state_dict()
    bad = torch.randn_like(images)
    bad[1, 0, 2, 2] = math.inf
    report = opt.step(named(bad))
    assert not report.applied and opt.skipped == 1
    after = opt.state_dict()
    assert torch.equal(after["images"], before["images"]) and torch.equal(after["images.momentum"],
                                                                          before["images.momentum"])
    assert after["updates"] == before["updates"] and after["grad_norm_ema"] == before["grad_norm_ema"]


def test_sgd_clips_the_gradient_before_it_enters_the_momentum():
    images = torch.zeros(4, 1, SIDE, SIDE)
    opt = make_meta(images, None, sgd(lr=1.0, momentum=0.5, clip_factor=2.0, ema_decay=0.9))
    g = torch.ones_like(images)
    first = opt.step(named(g))
    huge = opt.step(named(1000 * g))
    assert huge.clip_norm == pytest.approx(2 * first.grad_norm)
    # buf = 0.5 * g + (1000 g clipped to twice g's norm, i.e. 2 g) = 2.5 g; images = -g - 2.5 g
    torch.testing.assert_close(opt.tensors["images"], -3.5 * g)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_clip_factor_zero_never_clips(optimizer):
    images = torch.zeros(4, 1, SIDE, SIDE)
    opt = make_meta(images, None, MetaOptConfig(optimizer=optimizer, lr=0.1, clip_factor=0.0))
    g = torch.ones_like(images)
    opt.step(named(g))
    reference = make_meta(images, None, MetaOptConfig(optimizer=optimizer, lr=0.1, clip_factor=1e12))
    reference.step(named(g))
    report = opt.step(named(1e6 * g))
    reference.step(named(1e6 * g))
    assert report.clip_norm is None and report.grad_norm == pytest.approx(1e6 * float(g.norm()))
    assert torch.equal(opt.tensors["images"], reference.tensors["images"])


def test_sgd_state_round_trips_through_a_checkpoint_and_resumes_exactly(tmp_path):
    images, labels = torch.randn(4, 1, SIDE, SIDE), torch.eye(2).repeat(2, 1)
    a = make_meta(images, labels, sgd(clip_factor=2.0))
    for _ in range(3):
        a.step(named(torch.randn_like(images), torch.randn(4, 2)))
    state = a.state_dict()
    assert state["optimizer"] == "sgd" and {"images.momentum", "soft_labels.momentum"} <= set(state)
    assert not any(k.endswith((".m", ".v")) for k in state)  # no Adam moments to carry
    save_checkpoint(tmp_path, 3, *state_to_arrays(state))
    b = make_meta(torch.zeros_like(images), torch.zeros(4, 2), sgd(clip_factor=2.0))
    b.load_state_dict(arrays_to_state(*load_checkpoint(tmp_path / "ckpt-00000003.rdck")))
    for _ in range(3):
        g, gl = torch.randn_like(images), torch.randn(4, 2)
        assert a.step(named(g, gl)) == b.step(named(g, gl))
    assert torch.equal(a.tensors["images"], b.tensors["images"])
    assert torch.equal(a.tensors["soft_labels"], b.tensors["soft_labels"])
    assert a.updates == b.updates == 6 and a.grad_norm_ema == b.grad_norm_ema


def test_an_adam_state_written_before_sgd_existed_still_loads():
    images = torch.randn(4, 1, SIDE, SIDE)
    a = make_meta(images, None, MetaOptConfig())
    for _ in range(2):
        a.step(named(torch.randn_like(images)))
    legacy = {k: v for k, v in a.state_dict().items() if k != "optimizer"}  # the keys the old code wrote
    assert set(legacy) == {"updates", "skipped", "grad_norm_ema", "images", "images.m", "images.v"}
    b = make_meta(torch.zeros_like(images), None, MetaOptConfig())
    b.load_state_dict(legacy)
    g = torch.randn_like(images)
    a.step(named(g)), b.step(named(g))
    assert torch.equal(a.tensors["images"], b.tensors["images"])


def test_a_state_from_the_other_optimizer_is_refused():
    images = torch.randn(4, 1, SIDE, SIDE)
    adam_state = make_meta(images, None, MetaOptConfig()).state_dict()
    with pytest.raises(ValueError, match="resume with meta.optimizer=adam"):
        make_meta(images, None, sgd()).load_state_dict(adam_state)


@pytest.mark.parametrize("override,field", [("meta.optimizer=rmsprop", "meta.optimizer"),
                                            ("meta.momentum=1.0", "meta.momentum"),
                                            ("meta.momentum=-0.1", "meta.momentum"),
                                            ("meta.clip_factor=-1", "meta.clip_factor")])
def test_bad_meta_optimizer_settings_are_one_line_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override], check_paths=False)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_sgd_settings_load():
    cfg = load_config("quickstart", ["meta.optimizer=sgd", "meta.momentum=0.5", "meta.lr=1.0", "meta.clip_factor=0"],
                      check_paths=False)
    assert (cfg.meta.optimizer, cfg.meta.momentum, cfg.meta.lr, cfg.meta.clip_factor) == ("sgd", 0.5, 1.0, 0.0)
    assert MetaOptConfig().optimizer == "adam"  # the default is unchanged
