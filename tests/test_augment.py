"""Specification of raydistill.data.augment: differentiable, seeded, one strategy per batch."""

from __future__ import annotations

import pytest
import torch

from raydistill.data.augment import _rotate, augment


def images(n: int = 6, c: int = 2, h: int = 5, w: int = 7, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Random images: no symmetry, so a flip or a rotation always changes them."""
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_same_seed_reproduces_the_same_batch():
    x = images()
    for strategies in (["flip"], ["rotate"], ["flip", "rotate"]):
        first = augment(x, gen(7), strategies, rotate_degrees=20)
        second = augment(x, gen(7), strategies, rotate_degrees=20)
        assert torch.equal(first, second)


def test_different_seeds_give_different_batches():
    x = images(n=16)
    outputs = [augment(x, gen(s), ["rotate"], rotate_degrees=20) for s in range(3)]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


def test_generator_advances_the_same_whichever_strategy_is_drawn():
    x = images()
    states = []
    for strategies in (["flip"], ["rotate"], ["flip", "rotate"]):
        g = gen(1)
        augment(x, g, strategies, rotate_degrees=10)
        states.append(g.get_state())
    assert all(torch.equal(states[0], s) for s in states[1:])


def test_empty_strategies_return_the_input_and_draw_nothing():
    x = images()
    g = gen(2)
    before = g.get_state()
    assert augment(x, g, [], rotate_degrees=15) is x
    assert torch.equal(g.get_state(), before)


def test_flip_mirrors_each_image_or_leaves_it_alone():
    x = images(n=64)
    out = augment(x, gen(3), ["flip"], rotate_degrees=15)
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert torch.all(flipped ^ kept)
    assert 16 < flipped.sum().item() < 48  # each image is flipped with probability 1/2


def test_rotate_by_zero_degrees_is_the_identity():
    x = images()
    out = augment(x, gen(4), ["rotate"], rotate_degrees=0.0)
    assert torch.allclose(out, x, atol=1e-5)


def test_rotate_draws_an_angle_per_image():
    x = images(n=1).expand(8, -1, -1, -1)
    out = augment(x, gen(5), ["rotate"], rotate_degrees=30)
    assert not torch.allclose(out[0], x[0], atol=1e-3)
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8


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
        out = augment(x, gen(seed), ["flip", "rotate"], rotate_degrees=30)
        is_flip_or_identity = all(torch.equal(o, xi) or torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x))
        drawn.add("flip" if is_flip_or_identity else "rotate")
    assert drawn == {"flip", "rotate"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_shape_and_dtype(dtype):
    x = images(dtype=dtype)
    for strategy in ("flip", "rotate"):
        out = augment(x, gen(6), [strategy], rotate_degrees=15)
        assert out.shape == x.shape and out.dtype == dtype


@pytest.mark.parametrize("strategy", ["flip", "rotate"])
def test_gradients_flow_to_the_images(strategy):
    x = images(n=2, c=1, h=4, w=3, dtype=torch.float64).requires_grad_(True)
    # A fresh generator per call: gradcheck evaluates the function many times and needs the same draws each time.
    assert torch.autograd.gradcheck(lambda t: augment(t, gen(8), [strategy], rotate_degrees=25), (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_images_match_cpu_images_for_the_same_seed():
    x = images()
    for strategy in ("flip", "rotate"):
        cpu = augment(x, gen(9), [strategy], rotate_degrees=20)
        cuda = augment(x.cuda(), gen(9), [strategy], rotate_degrees=20)
        assert cuda.device.type == "cuda"
        assert torch.allclose(cuda.cpu(), cpu, atol=1e-5)
