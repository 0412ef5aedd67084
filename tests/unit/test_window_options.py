"""`ratbptt.window_segments` (checkpointed window) gives the plain gradient in less graph memory, and
`ratbptt.precision: bf16` gives a gradient close to the float32 one."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import raydistill.methods.ratbptt.meta_gradient as mg
from raydistill.config import AugmentConfig, ConfigError
from raydistill.methods.ratbptt.checkpointed import segment_lengths
from raydistill.methods.ratbptt.config import RatBpttConfig, validate_section
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient
from raydistill.models.registry import create_model

from helpers import AUG, convnet, dead_param_net, make_problem, relative_error


@pytest.fixture
def problem():
    return make_problem()


CASES = {  # name: (config, model factory)
    "adam, random window, minibatches, channels_last": (
        RatBpttConfig(unroll=8, window=5, inner_lr=0.01, real_batch=16, batch_per_class=1, classes_per_step=2,
                      channels_last=True), convnet),
    "sgd, random window, minibatches": (
        RatBpttConfig(unroll=8, window=5, inner_optimizer="sgd", inner_lr=0.05, real_batch=16, batch_per_class=1,
                      classes_per_step=2), convnet),
    "adam, window from step 0, a dead parameter": (
        RatBpttConfig(unroll=5, window=5, window_mode="full", inner_lr=0.01, real_batch=16), dead_param_net),
    "sgd, random_length window": (
        RatBpttConfig(unroll=7, window=5, window_mode="random_length", inner_optimizer="sgd", inner_lr=0.05,
                      real_batch=16, batch_per_class=1), convnet),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpointed_window_gives_the_plain_gradient(problem, case):
    images, hard, soft, real_x, real_y = problem
    cfg, factory = CASES[case]
    seed = 5
    plain = meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), factory, cfg, AUG, seed)
    assert torch.isfinite(plain.images).all() and plain.images.abs().max() > 0 and plain.labels.abs().max() > 0
    for segments in (2, 3, plain.window):
        ours = meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y),
                             factory, replace(cfg, window_segments=segments),
                             AUG, seed)
        assert (ours.start, ours.window) == (plain.start, plain.window)
        assert ours.meta_loss == pytest.approx(plain.meta_loss, rel=1e-12)
        assert relative_error(ours.images, plain.images) < 1e-10, segments
        assert relative_error(ours.labels, plain.labels) < 1e-10, segments


def test_checkpointed_window_with_fixed_labels_and_too_many_segments(problem):
    """Hard labels (one leaf); more segments than window steps (an unvalidated config) clamp to one step each."""
    images, hard, _, real_x, real_y = problem
    cfg = RatBpttConfig(unroll=6, window=3, window_mode="end", inner_lr=0.01, real_batch=16)
    plain = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), convnet, cfg, AUG, 2)
    ours = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y),
                         convnet, replace(cfg, window_segments=9), AUG, 2)
    assert ours.labels is None and ours.start == plain.start == 3
    assert relative_error(ours.images, plain.images) < 1e-10
    assert segment_lengths(3, 9) == [1, 1, 1] and segment_lengths(7, 3) == [3, 2, 2]


def test_checkpointed_path_applies_channels_last(problem, monkeypatch):
    images, hard, soft, real_x, real_y = problem
    calls = []
    original = mg.set_conv_channels_last
    monkeypatch.setattr(mg, "set_conv_channels_last", lambda model, on: calls.append(on) or original(model, on))
    cfg = RatBpttConfig(unroll=4, window=2, inner_lr=0.01, real_batch=16, channels_last=True, window_segments=2)
    meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), convnet, cfg, AUG, 1)
    assert calls == [True]


class SavedTensorPeak:
    """Bytes of tensors saved for backward and still alive, at their peak: a saved tensor counts from when an
    op packs it until its graph node is freed (the handle the hook returns dies with the node)."""

    class Handle:
        def __init__(self, tensor, size, owner):
            self.tensor, self.size, self.owner = tensor, size, owner

        def __del__(self):
            self.owner.live -= self.size

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        return self.Handle(tensor, size, self)

    @staticmethod
    def unpack(handle):
        return handle.tensor

    def measure(self, fn):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            fn()
        return self.peak


def test_checkpointed_window_keeps_a_fraction_of_the_graph(problem):
    """With W = 8 steps in 4 segments, at most 2 steps' graph is alive at once: the peak of saved-for-backward
    bytes falls well below the plain window's. A no-op option would keep the ratio at 1."""
    images, hard, soft, real_x, real_y = problem
    cfg = RatBpttConfig(unroll=8, window=8, window_mode="end", inner_lr=0.01, real_batch=16)

    def run(segments):
        c = replace(cfg, window_segments=segments)
        return lambda: meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), convnet, c, AUG, 4)

    plain, checkpointed = SavedTensorPeak().measure(run(1)), SavedTensorPeak().measure(run(4))
    assert plain > 0
    assert checkpointed < 0.45 * plain, (checkpointed, plain)


@pytest.mark.parametrize("kwargs, field", [
    (dict(window_segments=0), "ratbptt.window_segments: must be an integer >= 1"),
    (dict(window_segments=-2), "ratbptt.window_segments: must be an integer >= 1"),
    (dict(window_segments=2.5), "ratbptt.window_segments: must be an integer >= 1"),
    (dict(window=4, window_segments=5), "ratbptt.window_segments: 5 segments > window 4; set window_segments <= 4"),
    (dict(precision="fp16"), "ratbptt.precision: unknown value 'fp16'; choose one of float32, bf16"),
])
def test_bad_window_options_are_one_line_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as err:
        validate_section(RatBpttConfig(unroll=10, **{"window": 10, **kwargs}))
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_valid_window_options_pass():
    validate_section(RatBpttConfig(unroll=10, window=4, window_segments=4, precision="bf16"))


@pytest.mark.parametrize("optimizer, lr", [("sgd", 1e-2), ("adam", 1e-3), ("adam", 1e-2)])
def test_bf16_meta_gradient_is_close_to_float32(optimizer, lr):
    """A small but realistic float32 sample: registry ConvNet (width 32, 10 classes, IPC 1, 28x28), unroll 10,
    random window 5, real batch 64. bf16 covers the window and the meta-loss (the prefix stays float32), and rounds
    the inner gradients the meta-gradient differentiates through, so it is not exact; measured cosines (seeds
    7-9): SGD 0.995-0.997, Adam lr 1e-3 0.995, Adam lr 1e-2 0.996-0.999. With a bf16 prefix too they were 0.976-0.988
    for Adam; a window from step 0 with Adam gives 0.96-0.97 (the first Adam updates are ~sign(g), whose derivative
    weighs tiny gradient elements). The control shows the cosine discriminates: another seed (another network,
    window and batches) gives ~0.05."""
    classes, side = 10, 28
    g = torch.Generator().manual_seed(0)
    images = torch.randn(classes, 1, side, side, generator=g)
    hard = torch.arange(classes)
    real_x = torch.randn(256, 1, side, side, generator=g)
    real_y = torch.randint(0, classes, (256,), generator=g)

    def factory():
        return create_model("convnet", 1, classes, side, width=32, depth=3, norm="instance")

    cfg = RatBpttConfig(unroll=10, window=5, inner_optimizer=optimizer, inner_lr=lr, real_batch=64)
    aug = AugmentConfig(strategies=["flip", "crop"])
    fp32 = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), factory, cfg, aug, 7)
    bf16 = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y),
                         factory, replace(cfg, precision="bf16"), aug, 7)
    other = meta_gradient(SynSet(images, hard), RealBatch(real_x, real_y), factory, cfg, aug, 8)

    def cosine(a, b):
        return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()

    assert bf16.images.dtype == torch.float32 and torch.isfinite(bf16.images).all()
    assert not torch.equal(bf16.images, fp32.images)  # bf16 did run
    assert cosine(bf16.images, fp32.images) > 0.99
    assert cosine(other.images, fp32.images) < 0.5


def test_bf16_with_checkpointed_window_and_learned_labels(problem):
    """The two options compose: bf16 through the checkpointed path gives the bf16 plain gradient (same rounding:
    same ops), in the leaves' dtype."""
    images, hard, soft, real_x, real_y = problem
    images, soft, real_x = images.float(), soft.float(), real_x.float()
    cfg = RatBpttConfig(unroll=6, window=4, inner_lr=0.01, real_batch=16, batch_per_class=1, precision="bf16")
    plain = meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), lambda: convnet().float(), cfg, AUG, 3)
    ours = meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), lambda: convnet().float(),
                         replace(cfg, window_segments=2), AUG, 3)
    assert ours.images.dtype == ours.labels.dtype == torch.float32
    assert relative_error(ours.images, plain.images) < 1e-4
    assert relative_error(ours.labels, plain.labels) < 1e-4
