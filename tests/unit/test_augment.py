"""Specification of raydistill.data.augment: differentiable, seeded, one strategy per batch, DSA's strategies and
their Siamese form (one parameter set for every image of every batch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.config.schema import AUGMENTATIONS, AugmentConfig
from raydistill.data.augment import AugParams, _rotate, _whole_pixels, apply_params, augment, siamese_params

DSA = ["color", "crop", "cutout", "flip", "scale", "rotate"]


def images(n: int = 6, c: int = 2, h: int = 5, w: int = 7, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Random images: no symmetry, so a flip or a rotation always changes them."""
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def aug(strategies: list[str], rotate_degrees: float = 15.0, **ratios) -> AugmentConfig:
    return AugmentConfig(strategies=list(strategies), rotate_degrees=rotate_degrees, **ratios)


def recorded_augment(x, generator, strategies, rotate_degrees):
    """The flip/rotate augmentation exactly as it was before DSA's strategies were added (the RaT-BPTT benchmark
    figures were produced with it): the new code must consume the generator the same way and return the same bits."""
    if not strategies:
        return x
    n = x.shape[0]
    choice = int(torch.randint(len(strategies), (1,), generator=generator).item())
    flip_draws = torch.rand(n, generator=generator)
    angle_draws = torch.rand(n, generator=generator)
    if strategies[choice] == "flip":
        return torch.where((flip_draws < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    h, w = x.shape[-2:]
    radians = ((2.0 * angle_draws - 1.0) * rotate_degrees).to(torch.float64) * (math.pi / 180.0)
    cos, sin = radians.cos(), radians.sin()
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin * (h / w), sin * (w / h), cos
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ------------------------------------------------------------------------------------------ per-image augment

@pytest.mark.parametrize("strategies", [["flip"], ["rotate"], ["flip", "rotate"], ["rotate", "flip"]])
def test_flip_and_rotate_are_bit_identical_to_the_recorded_implementation(strategies):
    for seed in range(6):
        for x in (images(), images(n=3, c=3, h=8, w=8, dtype=torch.float64, seed=seed)):
            g_old, g_new = gen(seed), gen(seed)
            assert torch.equal(augment(x, g_new, aug(strategies, 17.0)), recorded_augment(x, g_old, strategies, 17.0))
            assert torch.equal(g_new.get_state(), g_old.get_state())  # the next batch's numbers are unchanged too


def test_the_ratios_of_unlisted_strategies_change_nothing():
    x = images()
    plain = augment(x, gen(3), aug(["flip", "rotate"]))
    other = augment(x, gen(3), aug(["flip", "rotate"], brightness=0.1, crop_pad=0.3, cutout_size=0.9, scale_ratio=2))
    assert torch.equal(plain, other)


def test_same_seed_reproduces_the_same_batch():
    x = images()
    for strategies in (["flip"], ["rotate"], ["flip", "rotate"], *[[s] for s in DSA], DSA):
        first = augment(x, gen(7), aug(strategies, 20))
        second = augment(x, gen(7), aug(strategies, 20))
        assert torch.equal(first, second)


def test_different_seeds_give_different_batches():
    x = images(n=16)
    for strategy in ("rotate", "color", "scale"):
        outputs = [augment(x, gen(s), aug([strategy], 20)) for s in range(3)]
        assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


def test_generator_advances_the_same_whichever_strategy_is_drawn():
    x = images()
    for listed in (["flip", "rotate"], DSA):
        states = []
        for k in range(len(listed)):  # the same draw picks a different strategy from each rotation of the list
            g = gen(1)
            augment(x, g, aug(listed[k:] + listed[:k], 10))
            states.append(g.get_state())
        assert all(torch.equal(states[0], s) for s in states[1:])


def test_empty_strategies_return_the_input_and_draw_nothing():
    x = images()
    g = gen(2)
    before = g.get_state()
    assert augment(x, g, aug([], 15)) is x
    assert siamese_params(g, aug([])) is None
    assert torch.equal(g.get_state(), before)


def test_flip_mirrors_each_image_or_leaves_it_alone():
    x = images(n=64)
    out = augment(x, gen(3), aug(["flip"], 15))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert torch.all(flipped ^ kept)
    assert 16 < flipped.sum().item() < 48  # each image is flipped with probability 1/2


def test_rotate_by_zero_degrees_is_the_identity():
    x = images()
    out = augment(x, gen(4), aug(["rotate"], 0.0))
    assert torch.allclose(out, x, atol=1e-5)


@pytest.mark.parametrize("strategy", ["rotate", "color", "crop", "cutout", "scale"])
def test_each_image_gets_its_own_parameters(strategy):
    x = images(n=1, h=16, w=16).expand(8, -1, -1, -1)
    out = augment(x, gen(5), aug([strategy], 30))
    assert len({tuple(o.flatten().tolist()) for o in out}) >= 6  # crop and cutout may repeat a draw by chance


def test_quarter_turn_maps_pixels_onto_pixels():
    x = images(h=6, w=6)
    quarter = _rotate(x, torch.full((len(x),), 90.0))
    assert any(torch.allclose(quarter, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5) for k in (1, 3))
    assert torch.allclose(_rotate(x, torch.full((len(x),), 180.0)), x.flip(-1).flip(-2), atol=1e-5)


def test_rotation_is_rigid_in_pixels_for_non_square_images():
    x = torch.zeros(1, 1, 9, 15)
    x[0, 0, 4, 7 + 3] = 1.0  # a dot 3 pixels right of the centre
    turned = _rotate(x, torch.tensor([90.0]))
    assert torch.nonzero(turned[0, 0] > 0.5).tolist() == [[4 - 3, 7]]  # 3 pixels above it: not stretched


def test_both_strategies_get_drawn():
    x = images(n=4)
    drawn = set()
    for seed in range(20):
        out = augment(x, gen(seed), aug(["flip", "rotate"], 30))
        is_flip_or_identity = all(torch.equal(o, xi) or torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x))
        drawn.add("flip" if is_flip_or_identity else "rotate")
    assert drawn == {"flip", "rotate"}


def test_every_dsa_strategy_gets_drawn():
    drawn = {siamese_params(gen(seed), aug(DSA)).strategy for seed in range(60)}
    assert drawn == set(DSA) == set(AUGMENTATIONS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_shape_and_dtype(dtype):
    x = images(dtype=dtype)
    for strategy in DSA:
        out = augment(x, gen(6), aug([strategy], 15))
        assert out.shape == x.shape and out.dtype == dtype
        assert apply_params(x, siamese_params(gen(6), aug([strategy]))).dtype == dtype


@pytest.mark.parametrize("strategy", DSA)
def test_gradients_flow_to_the_images(strategy):
    x = images(n=2, c=2, h=4, w=3, dtype=torch.float64).requires_grad_(True)
    # A fresh generator per call: gradcheck evaluates the function many times and needs the same draws each time.
    assert torch.autograd.gradcheck(lambda t: augment(t, gen(8), aug([strategy], 25, cutout_size=0.4)), (x,))


def test_an_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy 'mixup'"):
        augment(images(), gen(0), aug(["mixup"]))


# ------------------------------------------------------------------------------------------ each operation by hand

def test_flip_params_mirror_every_image():
    x = images()
    assert torch.equal(apply_params(x, AugParams("flip", flip=True)), x.flip(-1))
    assert torch.equal(apply_params(x, AugParams("flip", flip=False)), x)


def test_brightness_adds_the_drawn_constant():
    x = images()
    assert torch.allclose(apply_params(x, AugParams("color", brightness=0.25)), x + 0.25, atol=1e-6)


def test_saturation_scales_the_deviation_from_the_mean_over_channels():
    x = torch.tensor([[[[1.0, 3.0]], [[3.0, 5.0]]]])  # 2 channels, 1x2 pixels: channel means 2 and 4
    out = apply_params(x, AugParams("color", saturation=0.5))
    assert torch.allclose(out, torch.tensor([[[[1.5, 3.5]], [[2.5, 4.5]]]]))
    grey = images(c=1)
    assert torch.allclose(apply_params(grey, AugParams("color", saturation=0.0)), grey)  # one channel: no colour


def test_contrast_scales_the_deviation_from_the_image_mean():
    x = torch.tensor([[[[0.0, 1.0, 2.0, 5.0]]]])  # mean 2
    assert torch.allclose(apply_params(x, AugParams("color", contrast=2.0)), torch.tensor([[[[-2.0, 0.0, 2.0, 8.0]]]]))


def test_color_applies_brightness_saturation_and_contrast_in_turn():
    x = torch.tensor([[[[0.0, 2.0]], [[2.0, 0.0]]]])
    # + 1 -> [[1, 3], [3, 1]]; saturation 0.5 about the channel means 2 -> [[1.5, 2.5], [2.5, 1.5]];
    # contrast 3 about the image mean 2 -> [[0.5, 3.5], [3.5, 0.5]]
    out = apply_params(x, AugParams("color", brightness=1.0, saturation=0.5, contrast=3.0))
    assert torch.allclose(out, torch.tensor([[[[0.5, 3.5]], [[3.5, 0.5]]]]))


def test_crop_shifts_by_whole_pixels_and_fills_with_zeros():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    # crop_pad 0.25 of 4 pixels: shifts of up to 1 pixel; (1, -1): one row down, one column left.
    out = apply_params(x, AugParams("crop", shift=(1.0, -1.0), crop_pad=0.25))
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                             [2.0, 3.0, 4.0, 0.0],
                             [6.0, 7.0, 8.0, 0.0],
                             [10.0, 11.0, 12.0, 0.0]])
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(apply_params(x, AugParams("crop", shift=(0.0, 0.0), crop_pad=0.25)), x)


def test_crop_shifts_are_uniform_over_the_whole_pixels():
    fractions = (torch.arange(9000, dtype=torch.float64) + 0.5) / 4500 - 1  # evenly spread over [-1, 1)
    counts = torch.bincount(_whole_pixels(fractions, 4) + 4)
    assert counts.tolist() == [1000] * 9  # DSA: shifts -4..4 for 28- and 32-pixel images at crop_pad 0.125
    assert _whole_pixels(torch.tensor([-1.0, 0.0, 1.0]), 4).tolist() == [-4, 0, 4]


def test_cutout_zeroes_a_square_of_the_right_size():
    x = torch.ones(1, 2, 6, 6)
    out = apply_params(x, AugParams("cutout", cutout_at=(0.5, 0.5), cutout_size=0.5))  # side 3, centre pixel (3, 3)
    expected = torch.ones(6, 6)
    expected[2:5, 2:5] = 0.0
    assert torch.equal(out[0, 0], expected) and torch.equal(out[0, 1], expected)
    corner = apply_params(x, AugParams("cutout", cutout_at=(0.0, 0.99), cutout_size=0.5))  # clipped at the border
    expected = torch.ones(6, 6)
    expected[0:2, 4:6] = 0.0
    assert torch.equal(corner[0, 0], expected)


def test_scale_resamples_each_axis_about_the_centre():
    x = torch.zeros(1, 1, 9, 15)
    x[0, 0, 4, 7 + 2] = 1.0  # a dot 2 pixels right of the centre
    wide = apply_params(x, AugParams("scale", scale=(1.0, 0.5)))  # columns sampled at half their offsets: 2x wider
    assert torch.allclose(wide[0, 0, 4, 7 + 3: 7 + 6], torch.tensor([0.5, 1.0, 0.5]))
    assert torch.allclose(wide.sum(), torch.tensor(2.0)) and torch.allclose(wide[0, 0, [3, 5]], torch.zeros(2, 15))
    assert torch.allclose(apply_params(x, AugParams("scale", scale=(1.0, 1.0))), x, atol=1e-6)


def test_rotate_params_turn_every_image_by_the_same_angle():
    x = images()
    out = apply_params(x, AugParams("rotate", degrees=12.5))
    assert torch.equal(out, _rotate(x, torch.full((len(x),), 12.5)))


@pytest.mark.parametrize("params", [AugParams("flip", flip=True), AugParams("rotate", degrees=-11.0),
                                    AugParams("color", brightness=0.3, saturation=1.7, contrast=0.8),
                                    AugParams("crop", shift=(-0.6, 0.9), crop_pad=0.25),
                                    AugParams("cutout", cutout_at=(0.3, 0.6), cutout_size=0.5),
                                    AugParams("scale", scale=(1.15, 0.85))], ids=lambda p: p.strategy)
def test_gradcheck_every_operation_with_fixed_params(params):
    x = images(n=2, c=2, h=4, w=5, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: apply_params(t, params), (x,))
    x.grad = None
    apply_params(x, params).square().sum().backward()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------ Siamese parameters

@pytest.mark.parametrize("strategy", DSA)
def test_siamese_params_transform_batches_of_any_size_alike(strategy):
    cfg = aug([strategy], 30)
    params = siamese_params(gen(11), cfg)
    real, synthetic = images(n=7, h=8, w=8, seed=1), images(n=2, h=8, w=8, seed=2)
    for batch in (real, synthetic):
        out = apply_params(batch, params)
        for i in range(len(batch)):  # each image as if it were alone: the batch plays no part
            assert torch.allclose(out[i], apply_params(batch[i:i + 1], params)[0], atol=1e-6)
    same = real[:1].expand(3, -1, -1, -1)
    transformed = apply_params(same, params)
    assert torch.equal(transformed[0], transformed[1]) and torch.equal(transformed[0], transformed[2])


@pytest.mark.parametrize("strategy", [*DSA, "all"])
def test_siamese_params_are_what_augment_draws_for_a_single_image(strategy):
    x = images(n=1, h=8, w=8)
    cfg = aug(DSA if strategy == "all" else [strategy], 20)
    g1, g2 = gen(12), gen(12)
    assert torch.allclose(apply_params(x, siamese_params(g1, cfg)), augment(x, g2, cfg), atol=1e-6)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_siamese_params_reproduce_from_a_seed_and_differ_across_seeds():
    cfg = aug(DSA)
    assert [siamese_params(gen(s), cfg) for s in range(10)] == [siamese_params(gen(s), cfg) for s in range(10)]
    assert len({siamese_params(gen(s), cfg) for s in range(10)}) == 10


def test_siamese_params_hold_only_the_drawn_strategy_within_dsa_ranges():
    cfg = aug(DSA, 15)
    for seed in range(200):
        p = siamese_params(gen(seed), cfg)
        identity = AugParams(p.strategy)
        changed = {f for f in ("flip", "degrees", "brightness", "saturation", "contrast", "shift", "crop_pad",
                               "cutout_at", "cutout_size", "scale") if getattr(p, f) != getattr(identity, f)}
        owned = {"flip": {"flip"}, "rotate": {"degrees"}, "color": {"brightness", "saturation", "contrast"},
                 "crop": {"shift", "crop_pad"}, "cutout": {"cutout_at", "cutout_size"}, "scale": {"scale"}}
        assert changed <= owned[p.strategy]
        assert -15 <= p.degrees <= 15 and -0.5 <= p.brightness < 0.5 and 0 <= p.saturation < 2
        assert (p.contrast == 1.0) if p.strategy != "color" else (0.5 <= p.contrast < 1.5)
        assert all(-1 <= s < 1 for s in p.shift) and all(0 <= c < 1 for c in p.cutout_at)
        assert all(1 / 1.2 - 1e-6 <= s <= 1.2 + 1e-6 for s in p.scale)
        if p.strategy == "crop":
            assert p.crop_pad == 0.125
        if p.strategy == "cutout":
            assert p.cutout_size == 0.5


def test_none_params_leave_the_batch_alone():
    x = images()
    assert apply_params(x, None) is x


# ------------------------------------------------------------------------------------------ configuration

def test_defaults_are_dsa_published_values_and_keep_the_ratbptt_strategies():
    cfg = AugmentConfig()
    assert cfg.strategies == ["flip", "rotate"] and cfg.rotate_degrees == 15.0
    assert (cfg.brightness, cfg.saturation, cfg.contrast) == (1.0, 2.0, 0.5)
    assert (cfg.crop_pad, cfg.cutout_size, cfg.scale_ratio) == (0.125, 0.5, 1.2)


@pytest.mark.parametrize("override,field", [
    ("augment.strategies=[flip, mixup]", "augment.strategies[1]"), ("augment.brightness=-1", "augment.brightness"),
    ("augment.saturation=-0.5", "augment.saturation"), ("augment.contrast=-0.1", "augment.contrast"),
    ("augment.crop_pad=0.6", "augment.crop_pad"), ("augment.cutout_size=1.5", "augment.cutout_size"),
    ("augment.scale_ratio=0.8", "augment.scale_ratio"), ("augment.rotate_degrees=270", "augment.rotate_degrees"),
    ("augment.scale_ratio=.nan", "augment.scale_ratio")])
def test_bad_augment_settings_are_one_line_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override], check_paths=False)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_every_strategy_is_a_valid_setting():
    cfg = load_config("quickstart", [f"augment.strategies=[{', '.join(DSA)}]"], check_paths=False)
    assert cfg.augment.strategies == DSA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_images_match_cpu_images_for_the_same_seed():
    x = images()
    for strategy in DSA:
        cpu = augment(x, gen(9), aug([strategy], 20))
        cuda = augment(x.cuda(), gen(9), aug([strategy], 20))
        assert cuda.device.type == "cuda"
        assert torch.allclose(cuda.cpu(), cpu, atol=1e-5)
        params = siamese_params(gen(9), aug([strategy], 20))
        assert torch.allclose(apply_params(x.cuda(), params).cpu(), apply_params(x, params), atol=1e-5)
