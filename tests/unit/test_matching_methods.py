"""DM, CAFE, DC and DSA: each loss against a hand-written reference, each task's image gradient against finite
differences, a few updates lower each loss on Fashion-MNIST, and the presets and checks (in one process, no Ray)."""

import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import needs_fashion

from raydistill.config import ConfigError
from raydistill.config.loading import PRESETS
from raydistill.setup import config_from_dict, load_config
from raydistill.data.registry import load_dataset
from raydistill.engine.worker import method_resources
from raydistill.methods.base import IMAGES, seeded_network, task_seed
from raydistill.methods.cafe.loss import cafe_terms
from raydistill.methods.dc.loss import dc_loss, layerwise_distance, tensor_distance
from raydistill.methods.dm.loss import dm_loss
from raydistill.data.selection import class_index
from raydistill.methods.matching import MatchingContext, published_loops
from raydistill.methods.registry import get_method, method_names
from raydistill.models.registry import create_model
from raydistill.synset.synthetic import init_synthetic

METHODS = ("dm", "cafe", "dc", "dsa")
DSA_STRATEGIES = ["color", "crop", "cutout", "flip", "scale", "rotate"]
CLASSES, IPC, SIDE, REAL_PER_CLASS = 3, 2, 8, 5


def tiny_cfg(method: str, **section):
    strategies = [] if method == "dc" else DSA_STRATEGIES
    if method != "dm":
        section.setdefault("outer_loop", 1)  # episode k = 0: the network does not depend on the images
    return config_from_dict({"method": method, "ipc": IPC, "model": {"width": 4, "depth": 2},
                             "augment": {"strategies": strategies}, "init": {"mode": "real"},
                             method: {"batch_real": REAL_PER_CLASS, **section}}, check_paths=False)


def factory():
    return create_model("convnet", 1, CLASSES, SIDE, width=4, depth=2, norm="instance")


def problem(method: str, dtype=torch.float64, **section):
    """A tiny context (3 classes of 5 random 8x8 'real' images) and a synthetic set of 2 images per class."""
    g = torch.Generator().manual_seed(0)
    real_x = torch.randn(CLASSES * REAL_PER_CLASS, 1, SIDE, SIDE, generator=g, dtype=dtype)
    real_y = torch.arange(CLASSES).repeat_interleave(REAL_PER_CLASS)
    images = torch.randn(CLASSES * IPC, 1, SIDE, SIDE, generator=g, dtype=dtype)
    hard = torch.arange(CLASSES).repeat_interleave(IPC)
    ctx = MatchingContext(tiny_cfg(method, **section), real_x, real_y, class_index(real_y, CLASSES), factory)
    return ctx, images, hard


def network(images):
    return seeded_network(factory, torch.Generator().manual_seed(7), images)


# ---------------------------------------------------------------------------------------------- references


def test_dm_loss_is_the_squared_distance_of_class_mean_embeddings():
    ctx, images, hard = problem("dm")
    model = network(images)
    got = dm_loss(model, images, hard, ctx, REAL_PER_CLASS, None, torch.Generator().manual_seed(1))
    want = 0.0
    with torch.no_grad():
        for c in range(CLASSES):  # every real image of the class is drawn, so the order does not matter
            real = model.features(ctx.real_x[ctx.real_y == c]).mean(0)
            syn = model.features(images[hard == c]).mean(0)
            want += float(((real - syn) ** 2).sum())
    assert float(got.detach()) == pytest.approx(want, rel=1e-10)


def reference_distance(g_real, g_syn):
    total = 0.0
    for r, s in zip(g_real, g_syn):
        if r.dim() == 1:
            continue  # biases and norm parameters do not count
        r, s = r.reshape(r.shape[0], -1), s.reshape(s.shape[0], -1)
        for i in range(r.shape[0]):
            total += 1 - float(r[i] @ s[i]) / (float(r[i].norm() * s[i].norm()) + 1e-6)
    return total


def test_dc_distance_is_one_minus_cosine_per_output_row_and_ignores_1d_tensors():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 2, 3, 3), (5, 7), (4,)]
    real = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    syn = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    assert float(layerwise_distance(real, syn)) == pytest.approx(reference_distance(real, syn), rel=1e-12)
    assert float(tensor_distance(real[2], syn[2])) == 0.0
    # scale-free per row (up to the 1e-6 in the denominator)
    assert float(tensor_distance(real[1], 3 * real[1])) == pytest.approx(0.0, abs=1e-5)


def test_dc_loss_matches_per_class_parameter_gradients():
    ctx, images, hard = problem("dc")
    model = network(images)
    got = dc_loss(model, images, hard, ctx, REAL_PER_CLASS, None, torch.Generator().manual_seed(1))
    params = list(model.parameters())
    want = 0.0
    for c in range(CLASSES):
        real = ctx.real_x[ctx.real_y == c]
        g_real = torch.autograd.grad(F.cross_entropy(model(real), torch.full((len(real),), c)), params)
        g_syn = torch.autograd.grad(F.cross_entropy(model(images[hard == c]), torch.full((IPC,), c)), params)
        want += reference_distance(g_real, g_syn)
    assert float(got.detach()) == pytest.approx(want, rel=1e-9)


def test_cafe_terms_match_a_layer_by_layer_reference():
    ctx, images, hard = problem("cafe")
    section = ctx.cfg.method_config
    model = network(images)
    feature, discrimination = cafe_terms(model, images, hard, ctx, section, None, torch.Generator().manual_seed(1))
    feature, discrimination = feature.detach(), discrimination.detach()
    model.requires_grad_(False)  # the reference below needs no graph

    def blocks(x):  # ConvNet: body = [Sequential(ConvNormReLU, AvgPool2d)] x depth; match each block's activation
        outs = []
        for block in model.body:
            act = block[0](x)
            outs.append(act)
            x = block[1](act)
        return outs, x.flatten(1)

    weights = [0.1, 1.0]  # depth 2: the published pattern, the deepest block 1.0
    want_feature, centres, real_embs = 0.0, [], []
    for c in range(CLASSES):
        real_outs, real_emb = blocks(ctx.real_x[ctx.real_y == c])
        syn_outs, syn_emb = blocks(images[hard == c])
        for w, r, s in zip(weights, real_outs, syn_outs):
            want_feature += w * float(((r.mean(0) - s.mean(0)) ** 2).sum())
        want_feature += 2.0 * float(((real_emb.mean(0) - syn_emb.mean(0)) ** 2).sum())
        centres.append(syn_emb.mean(0))
        real_embs.append(real_emb)
    logits = torch.cat(real_embs) @ torch.stack(centres).t()
    want_disc = F.cross_entropy(logits, ctx.real_y, reduction="sum")
    assert float(feature) == pytest.approx(want_feature, rel=1e-10)
    assert float(discrimination) == pytest.approx(float(want_disc), rel=1e-10)


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("method", METHODS)
def test_the_task_gradient_is_the_derivative_of_the_task_loss(method):
    """float64 central differences of the task's own loss (same seed: same network, real batches, augmentation)."""
    ctx, images, hard = problem(method)
    ctx.model_factory = lambda: factory().double()
    m = get_method(method)
    seed = task_seed(0, 3, 1)

    def task(x):
        return m.gradient(ctx, {IMAGES: x}, hard, 3, 1, None)

    result = task(images)
    grad = result.grads[IMAGES]
    assert grad.shape == images.shape and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    eps = 1e-6
    g = torch.Generator().manual_seed(seed)
    for flat in torch.randperm(images.numel(), generator=g)[:6].tolist():
        bump = torch.zeros(images.numel(), dtype=images.dtype)
        bump[flat] = eps
        bump = bump.view_as(images)
        numeric = (task(images + bump).loss - task(images - bump).loss) / (2 * eps)
        assert numeric == pytest.approx(float(grad.flatten()[flat]), rel=1e-4, abs=1e-7), flat


@pytest.mark.parametrize("method", ["dc", "cafe"])
def test_a_task_is_a_pure_function_of_step_and_slot_and_records_its_episode(method):
    ctx, images, hard = problem(method, dtype=torch.float32, outer_loop=4, inner_loop=2)
    m = get_method(method)
    a, b = (m.gradient(ctx, {IMAGES: images}, hard, 5, 0, None) for _ in range(2))
    assert torch.equal(a.grads[IMAGES], b.grads[IMAGES]) and a.loss == b.loss
    assert a.stats["net_epochs"] == 2 * a.stats["episode"] and 0 <= a.stats["episode"] < 4
    episodes = {m.gradient(ctx, {IMAGES: images}, hard, step, 0, None).stats["episode"] for step in range(12)}
    assert len(episodes) > 1  # the position is drawn from the seed


# ---------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def fashion():
    return load_dataset(config_from_dict({"data": {"val_size": 200}}).data)


@needs_fashion
@pytest.mark.parametrize("method,lr", [("dm", 1.0), ("cafe", 0.1), ("dc", 0.1), ("dsa", 0.1)])
def test_a_few_updates_lower_the_method_loss_on_fashion_mnist(fashion, method, lr):
    strategies = [] if method == "dc" else DSA_STRATEGIES
    section = {"batch_real": 64} if method == "dm" else {"batch_real": 64, "outer_loop": 2, "inner_loop": 2}
    cfg = config_from_dict({"method": method, "ipc": 1, "model": {"width": 16}, "init": {"mode": "real"},
                            "augment": {"strategies": strategies}, "data": {"val_size": 200}, method: section})
    dataset = fashion
    m = get_method(method)
    ctx = m.setup(cfg, method_resources(cfg, dataset, m.needs, torch.device("cpu")))
    images = init_synthetic(cfg, dataset, m).learnables[IMAGES]
    hard = torch.arange(10)
    step = 4  # one fixed task: the same network, episode, real batches and augmentation every time

    before = m.gradient(ctx, {IMAGES: images}, hard, step, 0, None).loss
    velocity = torch.zeros_like(images)
    for _ in range(5):  # the published image update: SGD with momentum 0.5
        velocity = 0.5 * velocity + m.gradient(ctx, {IMAGES: images}, hard, step, 0, None).grads[IMAGES]
        images = images - lr * velocity
    after = m.gradient(ctx, {IMAGES: images}, hard, step, 0, None).loss
    assert after < 0.9 * before


# ---------------------------------------------------------------------------------------------- config


def test_the_matching_methods_are_registered():
    assert set(METHODS) <= set(method_names())


def test_published_loops_by_ipc_and_the_nearest_for_others():
    assert [published_loops(k) for k in (1, 10, 50)] == [(1, 1), (10, 50), (50, 10)]
    assert published_loops(2) == (1, 1) and published_loops(12) == (10, 50) and published_loops(100) == (50, 10)


@pytest.mark.parametrize("overrides,match", [
    ({"labels": {"learn": True}}, "labels.learn: dm matches"),
    ({"dm": {"batch_real": 0}}, "dm.batch_real"),
])
def test_dm_checks(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"method": "dm", **overrides}, check_paths=False)


def test_dsa_needs_an_augmentation_and_dc_checks_its_loops():
    with pytest.raises(ConfigError, match="augment.strategies: dsa needs"):
        config_from_dict({"method": "dsa", "augment": {"strategies": []}}, check_paths=False)
    with pytest.raises(ConfigError, match="dc.inner_loop"):
        config_from_dict({"method": "dc", "dc": {"inner_loop": 0}}, check_paths=False)


def test_cafe_layer_weights_must_fit_the_network():
    cfg = config_from_dict({"method": "cafe", "cafe": {"layer_weights": [1, 1, 1]}}, check_paths=False)
    assert cfg.method_config.layer_weights == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="cafe.layer_weights: 2 weights, but convnet has 3 matched blocks"):
        config_from_dict({"method": "cafe", "cafe": {"layer_weights": [1, 1]}}, check_paths=False)


NEW_PRESETS = sorted(p.name[:-5] for p in PRESETS.iterdir() if re.match(r"(dm|cafe|dc|dsa)-.*\.yaml$", p.name))


def test_there_is_a_preset_per_method_data_set_and_ipc():
    want = {f"{m}-{d}-ipc{k}" for m in METHODS for d in ("fashion-mnist", "cifar10", "cifar100") for k in (1, 10, 50)}
    assert want <= set(NEW_PRESETS)


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_every_new_preset_loads_validates_and_cites_its_numbers(name):
    cfg = load_config(name, check_paths=False)
    method, _, rest = name.partition("-")
    assert cfg.method == method and cfg.ipc == int(rest.rsplit("ipc", 1)[1])
    assert cfg.init.mode == "real" and cfg.meta.optimizer == "sgd" and cfg.meta.momentum == 0.5
    if method != "dc":
        assert cfg.augment.strategies == DSA_STRATEGIES
    text = (PRESETS / f"{name}.yaml").read_text()
    yaml.safe_load(text)
    uncited = [line for line in text.splitlines() if re.search(r"\d", line.split("#")[0]) and "#" not in line]
    assert not uncited, f"{name}: numbers without a source comment: {uncited}"
