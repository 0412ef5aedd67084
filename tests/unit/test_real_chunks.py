"""`ratbptt.real_batch_chunks` runs the meta-loss's real batch in chunks: the same meta-gradient (float64) with the
real batch's activations alive one chunk at a time."""

from dataclasses import replace

import pytest
import torch
from helpers import AUG, convnet, make_problem, relative_error

from raydistill.config import ConfigError
from raydistill.methods.ratbptt.config import RatBpttConfig, validate_section
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, Unroll, meta_gradient
from raydistill.setup import load_config


@pytest.fixture
def problem():
    return make_problem()


CFG = RatBpttConfig(unroll=6, window=4, inner_lr=0.01, real_batch=16, batch_per_class=1)


def sample(problem, cfg, labels=True, seed=3):
    images, hard, soft, real_x, real_y = problem
    syn = SynSet(images, hard, soft if labels else None)
    factory = convnet if images.dtype == torch.float64 else (lambda: convnet().float())
    return meta_gradient(syn, RealBatch(real_x, real_y), factory, cfg, AUG, seed)


@pytest.mark.parametrize("segments", [1, 2])
def test_chunked_real_batch_gives_the_one_batch_gradient(problem, segments):
    """Plain and checkpointed windows, images and learned labels, even (2), uneven (3: 6 + 5 + 5) and one-image
    chunks (16); float64, so anything beyond summation order would show."""
    cfg = replace(CFG, window_segments=segments)
    whole = sample(problem, cfg)
    assert whole.images.abs().max() > 0 and whole.labels.abs().max() > 0
    for chunks in (2, 3, cfg.real_batch):
        ours = sample(problem, replace(cfg, real_batch_chunks=chunks))
        assert (ours.start, ours.window) == (whole.start, whole.window)
        assert ours.meta_loss == pytest.approx(whole.meta_loss, rel=1e-12)  # the same batch: the same draws
        assert relative_error(ours.images, whole.images) < 1e-10, chunks
        assert relative_error(ours.labels, whole.labels) < 1e-10, chunks


def test_chunks_compose_with_segments_and_a_per_step_class_subset(problem):
    """All three memory levers at once (chunks, segments, batch_per_class with classes_per_step) give the gradient of
    the same config without chunks and segments (float64)."""
    cfg = replace(CFG, classes_per_step=2)
    whole = sample(problem, cfg)
    ours = sample(problem, replace(cfg, real_batch_chunks=3, window_segments=2))
    assert relative_error(ours.images, whole.images) < 1e-10
    assert relative_error(ours.labels, whole.labels) < 1e-10


def test_chunked_real_batch_with_fixed_labels(problem):
    whole = sample(problem, CFG, labels=False)
    ours = sample(problem, replace(CFG, real_batch_chunks=3), labels=False)
    assert ours.labels is None
    assert relative_error(ours.images, whole.images) < 1e-10


def test_chunks_of_one_are_todays_path(problem, monkeypatch):
    """real_batch_chunks = 1 never enters the chunked code (bit-identical to one batch)."""
    monkeypatch.setattr(Unroll, "meta_loss_and_gradient", lambda *a: pytest.fail("chunked path entered"))
    sample(problem, CFG)


def float32(problem):
    images, hard, soft, real_x, real_y = problem
    return images.float(), hard, soft.float(), real_x.float(), real_y


def test_float32_chunked_real_batch_is_close(problem):
    problem = float32(problem)
    for segments in (1, 2):
        whole = sample(problem, replace(CFG, window_segments=segments))
        ours = sample(problem, replace(CFG, window_segments=segments, real_batch_chunks=4))
        assert ours.images.dtype == torch.float32
        assert relative_error(ours.images, whole.images) < 1e-5
        assert relative_error(ours.labels, whole.labels) < 1e-5


def test_bf16_applies_to_the_chunks(problem):
    """With precision bf16 the chunk forwards run under autocast too: close to the unchunked bf16 gradient (bf16
    rounding of different batch shapes only) and not the float32 one."""
    problem = float32(problem)
    bf16 = replace(CFG, precision="bf16")
    whole = sample(problem, bf16)
    ours = sample(problem, replace(bf16, real_batch_chunks=4))
    fp32 = sample(problem, replace(CFG, real_batch_chunks=4))
    assert ours.images.dtype == torch.float32 and torch.isfinite(ours.images).all()
    assert relative_error(ours.images, whole.images) < 2e-2
    assert relative_error(ours.labels, whole.labels) < 2e-2
    assert relative_error(ours.images, fp32.images) > 1e-4  # bf16 did run in the chunks


class SavedTensorPeak:
    """Bytes of tensors saved for backward and still alive, at their peak (as in test_window_options.py)."""

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


def test_chunks_keep_a_fraction_of_the_real_batch_activations(problem):
    """The meta-loss's part alone (the final parameters as leaves): 4 chunks keep about a quarter of the real
    batch's saved activations alive; a no-op option would keep the ratio at 1."""
    images, hard, soft, real_x, real_y = problem
    cfg = replace(CFG, real_batch=40)

    def run(chunks):
        unroll = Unroll(SynSet(images, hard, soft), convnet, replace(cfg, real_batch_chunks=chunks), AUG, 0)
        final = [p.detach().reshape(-1) for p in unroll.model.parameters()]
        final = [torch.cat(final).requires_grad_(True)]
        return lambda: unroll.meta_loss_and_gradient(final, RealBatch(real_x, real_y))

    whole, chunked = SavedTensorPeak().measure(run(1)), SavedTensorPeak().measure(run(4))
    assert whole > 0
    assert chunked < 0.3 * whole, (chunked, whole)


def test_chunks_lower_the_meta_gradients_peak(problem):
    """The whole sample, plain window: with a one-step window the real batch dominates the saved bytes, and 4
    chunks lower the peak."""
    images, hard, soft, real_x, real_y = problem
    cfg = RatBpttConfig(unroll=2, window=1, window_mode="end", inner_lr=0.01, real_batch=40, batch_per_class=1)

    def run(chunks):
        c = replace(cfg, real_batch_chunks=chunks)
        return lambda: meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), convnet, c, AUG, 4)

    whole, chunked = SavedTensorPeak().measure(run(1)), SavedTensorPeak().measure(run(4))
    assert chunked < 0.6 * whole, (chunked, whole)


@pytest.mark.parametrize("kwargs, field", [
    (dict(real_batch_chunks=0), "ratbptt.real_batch_chunks: must be an integer >= 1"),
    (dict(real_batch_chunks=-1), "ratbptt.real_batch_chunks: must be an integer >= 1"),
    (dict(real_batch_chunks=2.5), "ratbptt.real_batch_chunks: must be an integer >= 1"),
    (dict(real_batch_chunks=True), "ratbptt.real_batch_chunks: must be an integer >= 1"),
    (dict(real_batch=16, real_batch_chunks=17),
     "ratbptt.real_batch_chunks: 17 chunks > real_batch 16; set real_batch_chunks <= 16"),
    (dict(real_batch_chunks=2, samples_per_task=2),
     "ratbptt.samples_per_task: 2 samples per task do not combine with real_batch_chunks > 1"),
])
def test_bad_real_batch_chunks_are_one_line_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as err:
        validate_section(RatBpttConfig(unroll=10, window=10, **kwargs))
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_valid_real_batch_chunks_pass_and_load():
    validate_section(RatBpttConfig(unroll=10, window=4, real_batch=16, real_batch_chunks=16))
    cfg = load_config("quickstart", ["ratbptt.real_batch_chunks=4"], check_paths=False)
    assert cfg.method_config.real_batch_chunks == 4
