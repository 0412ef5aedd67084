"""`ratbptt.samples_per_task`: K samples batched through torch.func give the mean of the K samples computed one by
one (float64), and the option's config checks."""

from dataclasses import replace

import pytest
import torch

from helpers import AUG, convnet, dead_param_net, make_problem, relative_error

from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.methods.base import IMAGES, SOFT_LABELS, task_seed
from raydistill.methods.ratbptt.batched import batched_meta_gradient, sample_seed
from raydistill.methods.ratbptt.config import RatBpttConfig, validate_samples, validate_section
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient
from raydistill.methods.ratbptt.method import RatBptt, RatBpttContext

K = 3  # samples per task


@pytest.fixture
def problem():
    return make_problem()

CASES = {  # name: (config, model factory, learned labels)
    "adam, random window, minibatches, learned labels": (
        RatBpttConfig(unroll=9, window=3, inner_lr=0.01, real_batch=16, batch_per_class=1, classes_per_step=2),
        convnet, True),
    "sgd, random window, hard labels": (
        RatBpttConfig(unroll=9, window=3, inner_optimizer="sgd", inner_lr=0.05, real_batch=16), convnet, False),
    "adam, window from step 0, a dead parameter": (
        RatBpttConfig(unroll=4, window=4, window_mode="full", inner_lr=0.01, real_batch=16), dead_param_net, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_samples_are_the_mean_of_single_samples(problem, case):
    images, hard, soft, real_x, real_y = problem
    cfg, factory, learned = CASES[case]
    cfg = replace(cfg, samples_per_task=K)
    soft = soft if learned else None
    seed = 11
    batched = batched_meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), factory, cfg, AUG, seed)
    singles = [meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y),
                             factory, cfg, AUG, sample_seed(seed, k))
               for k in range(K)]
    assert batched.starts == [s.start for s in singles]
    if cfg.window_mode == "random":  # the lockstep prefix with networks dropping out is exercised
        assert len(set(batched.starts)) > 1
    assert len({sample_seed(seed, k) for k in range(K)}) == K
    mean_images = sum(s.images for s in singles) / K
    assert torch.isfinite(batched.images).all() and mean_images.abs().max() > 0
    assert relative_error(batched.images, mean_images) < 1e-10
    # the mean is not any one sample's gradient (the samples differ)
    assert min(relative_error(s.images, mean_images) for s in singles) > 1e-3
    if learned:
        mean_labels = sum(s.labels for s in singles) / K
        assert relative_error(batched.labels, mean_labels) < 1e-10
    assert batched.meta_loss == pytest.approx(sum(s.meta_loss for s in singles) / K, rel=1e-12)
    assert batched.window == singles[0].window


def test_the_method_returns_the_batched_mean_and_each_start(problem):
    images, hard, soft, real_x, real_y = problem
    cfg = load_config("quickstart", ["ratbptt.unroll=6", "ratbptt.window=2", "ratbptt.real_batch=8",
                                     "ratbptt.samples_per_task=2", "augment.strategies=[]"], check_paths=False)
    method = RatBptt()
    method.validate(cfg.method_config, cfg)
    context = RatBpttContext(cfg, real_x, real_y, convnet)
    out = method.gradient(context, {IMAGES: images, SOFT_LABELS: soft}, hard, step=3, slot=1, slot_state=None)
    seed = task_seed(cfg.seed, 3, 1)
    direct = batched_meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y),
                                   convnet, cfg.method_config, cfg.augment, seed)
    assert torch.equal(out.grads[IMAGES], direct.images) and torch.equal(out.grads[SOFT_LABELS], direct.labels)
    assert out.stats["starts"] == direct.starts and len(out.stats["starts"]) == 2
    one = replace(cfg, method_config=replace(cfg.method_config, samples_per_task=1))
    single = method.gradient(RatBpttContext(one, real_x, real_y, convnet), {IMAGES: images, SOFT_LABELS: soft}, hard,
                             step=3, slot=1, slot_state=None)
    assert "starts" not in single.stats
    assert not torch.equal(single.grads[IMAGES], out.grads[IMAGES])


@pytest.mark.parametrize("change, needle", [
    ({"samples_per_task": 0}, "must be an integer >= 1"),
    ({"samples_per_task": True}, "must be an integer >= 1"),
    ({"samples_per_task": 2, "window_mode": "random_length"}, "random_length"),
    ({"samples_per_task": 2, "window_segments": 2}, "window_segments > 1"),
    ({"samples_per_task": 2, "precision": "bf16"}, "precision bf16"),
    ({"samples_per_task": 2, "channels_last": True}, "channels_last"),
])
def test_samples_per_task_config_errors(change, needle):
    cfg = replace(RatBpttConfig(unroll=10, window=4), **change)
    with pytest.raises(ConfigError, match="ratbptt.samples_per_task") as err:
        validate_section(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)
    validate_section(replace(cfg, samples_per_task=1))  # the other option alone is fine


def test_samples_per_task_rejects_batch_norm_when_the_config_loads():
    with pytest.raises(ConfigError, match="samples_per_task.*model.norm batch"):
        load_config("quickstart", ["ratbptt.samples_per_task=2", "model.norm=batch"], check_paths=False)
    cfg = load_config("quickstart", ["ratbptt.samples_per_task=2", "model.norm=none"], check_paths=False)
    validate_samples(cfg.method_config, cfg.model.norm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batched_samples_are_the_mean_of_single_samples(problem):
    images, hard, soft, real_x, real_y = (t.cuda() for t in problem)
    cfg, factory, _ = CASES["adam, random window, minibatches, learned labels"]
    cfg = replace(cfg, samples_per_task=K)
    batched = batched_meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), factory, cfg, AUG, 11)
    singles = [meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y),
                             factory, cfg, AUG, sample_seed(11, k))
               for k in range(K)]
    assert batched.images.device.type == "cuda"
    assert relative_error(batched.images, sum(s.images for s in singles) / K) < 1e-8
    assert relative_error(batched.labels, sum(s.labels for s in singles) / K) < 1e-8
