"""Differentiable augmentation of image batches (the RaT-BPTT recipe: one strategy drawn per batch).

Synthetic images are augmented inside the unrolled inner loop, so every operation here is differentiable with
respect to the images. Random numbers come from a caller-owned CPU `torch.Generator` and are moved to the images'
device afterwards, so a seed reproduces the same batch on CPU and GPU alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def augment(x: Tensor, generator: torch.Generator, strategies: list[str], rotate_degrees: float) -> Tensor:
    """Augment a batch `x` (N, C, H, W) with one strategy drawn uniformly from `strategies`.

    `flip` mirrors each image horizontally with probability 1/2; `rotate` turns each image by its own angle drawn
    uniformly from [-rotate_degrees, rotate_degrees] (bilinear, zero padding). An empty `strategies` returns `x`
    unchanged and draws nothing. `generator` must be a CPU generator.
    """
    if not strategies:
        return x
    n = x.shape[0]
    # Draw everything every call, whichever strategy wins: the generator then advances by an amount that depends only
    # on the batch size, so the streams of later batches do not hinge on which strategy an earlier batch drew.
    choice = int(torch.randint(len(strategies), (1,), generator=generator).item())
    flip_draws = torch.rand(n, generator=generator)
    angle_draws = torch.rand(n, generator=generator)

    strategy = strategies[choice]
    if strategy == "flip":
        return _flip(x, flip_draws < 0.5)
    if strategy == "rotate":
        degrees = (2.0 * angle_draws - 1.0) * rotate_degrees
        return _rotate(x, degrees)
    raise ValueError(f"augment: unknown strategy {strategy!r}; choose flip or rotate")


def _flip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror along the width the images whose `mask` entry is True."""
    mask = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image about its centre by its own angle in degrees (zero outside the source image)."""
    n, _, h, w = x.shape
    radians = degrees.to(torch.float64) * (math.pi / 180.0)
    cos, sin = radians.cos(), radians.sin()
    # affine_grid works in coordinates normalised to [-1, 1] per axis; conjugating by the aspect ratio keeps the
    # rotation rigid in pixel space for non-square images (it is the identity scaling for square ones).
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * (w / h)
    theta[:, 1, 1] = cos
    theta = theta.to(dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
