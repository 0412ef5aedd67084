"""Differentiable augmentation of image batches: DSA's strategies (Zhao & Bilen, ICML 2021), one drawn per batch.

Synthetic images are augmented inside the unrolled inner loop and inside the matching losses, so every operation
here is differentiable with respect to the images. Random numbers come from a caller-owned CPU `torch.Generator` and
are moved to the images' device afterwards, so a seed reproduces the same batch on CPU and GPU alike.

Two ways to use it:

- `augment(x, generator, cfg)`: each image gets its own parameters (training a network on a batch).
- `siamese_params(generator, cfg)` then `apply_params(x, params)`: one parameter set applied to every image of every
  batch it is given. This is DSA's Siamese augmentation: the real and the synthetic batch of a class are transformed
  alike before their gradients, features or statistics are matched.

The strategies, with the ratios of `AugmentConfig` (defaults: DSA's published values):

- `color`: brightness, saturation and contrast in turn: add b from [-brightness/2, brightness/2); scale the
  deviation from the mean over channels by s from [0, saturation); scale the deviation from the image's mean by c
  from [contrast, contrast + 1).
- `crop`: translate by whole pixels, at most round(crop_pad x size) each way, filling with zeros (pad, then crop).
- `cutout`: zero a square of side round(cutout_size x size) centred on a random pixel (clipped at the borders).
- `flip`: mirror along the width with probability 1/2.
- `scale`: resample rows and columns at coordinates multiplied by their own factor from [1/scale_ratio, scale_ratio]
  (bilinear, zero padding; a factor > 1 shrinks the content).
- `rotate`: turn by an angle from [-rotate_degrees, rotate_degrees] (bilinear, zero padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from raydistill.config.schema import AUGMENTATIONS, AugmentConfig


@dataclass(frozen=True)
class AugParams:
    """One strategy and ONE parameter set, shared by every image of every batch it is applied to.

    Only the fields of `strategy` are read; the others keep their identity defaults. Crop and cutout are stored
    relative to the image size and become whole pixels when applied, so one AugParams fits images of any size.
    """

    strategy: str
    flip: bool = False  # flip: mirror along the width
    degrees: float = 0.0  # rotate: anticlockwise angle
    brightness: float = 0.0  # color: added to every value
    saturation: float = 1.0  # color: factor on the deviation from the mean over channels
    contrast: float = 1.0  # color: factor on the deviation from the image's mean
    shift: tuple[float, float] = (0.0, 0.0)  # crop: (down, right), fractions in [-1, 1] of the largest shift
    crop_pad: float = 0.0  # crop: the largest shift, as a fraction of the image's height and width
    cutout_at: tuple[float, float] = (0.5, 0.5)  # cutout: the square's centre as fractions in [0, 1) of (height, width)
    cutout_size: float = 0.0  # cutout: the square's side as a fraction of the image's height and width
    scale: tuple[float, float] = (1.0, 1.0)  # scale: (rows, columns) coordinate factors


def augment(x: Tensor, generator: torch.Generator, cfg: AugmentConfig) -> Tensor:
    """Augment a batch `x` (N, C, H, W) with one strategy drawn uniformly from `cfg.strategies`, each image with
    its own parameters. An empty `cfg.strategies` returns `x` unchanged and draws nothing. `generator` must be a
    CPU generator."""
    if not cfg.strategies:
        return x
    strategy, p = _draw(generator, cfg, x.shape[0])
    return _apply(x, strategy, p, cfg.crop_pad, cfg.cutout_size)


def siamese_params(generator: torch.Generator, cfg: AugmentConfig) -> AugParams | None:
    """One strategy drawn uniformly from `cfg.strategies` and one parameter set for it, from the CPU `generator`;
    None (drawing nothing) if `cfg.strategies` is empty."""
    if not cfg.strategies:
        return None
    strategy, p = _draw(generator, cfg, 1)
    one = {name: value[..., 0].tolist() for name, value in p.items()}  # floats, or pairs of floats
    fields = {
        "flip": {"flip": one["flip"]},
        "rotate": {"degrees": one["degrees"]},
        "color": {"brightness": one["brightness"], "saturation": one["saturation"], "contrast": one["contrast"]},
        "crop": {"shift": tuple(one["shift"]), "crop_pad": cfg.crop_pad},
        "cutout": {"cutout_at": tuple(one["cutout_at"]), "cutout_size": cfg.cutout_size},
        "scale": {"scale": tuple(one["scale"])},
    }
    if strategy not in fields:
        raise ValueError(f"siamese_params: unknown strategy {strategy!r}; choose one of {', '.join(fields)}")
    return AugParams(strategy, **fields[strategy])


def apply_params(x: Tensor, params: AugParams | None) -> Tensor:
    """Apply `params` to every image of `x` (N, C, H, W), on any device; differentiable with respect to `x`.
    None returns `x` unchanged."""
    if params is None:
        return x
    n = x.shape[0]

    def per_image(*values: float) -> Tensor:  # the same value(s) for every image: (n,) for one, (len(values), n)
        return torch.tensor(values, dtype=torch.float64).view(-1, 1).expand(-1, n).squeeze(0)

    p = {"flip": torch.full((n,), params.flip), "degrees": per_image(params.degrees),
         "brightness": per_image(params.brightness), "saturation": per_image(params.saturation),
         "contrast": per_image(params.contrast), "shift": per_image(*params.shift),
         "cutout_at": per_image(*params.cutout_at), "scale": per_image(*params.scale)}
    return _apply(x, params.strategy, p, params.crop_pad, params.cutout_size)


def _draw(generator: torch.Generator, cfg: AugmentConfig, n: int) -> tuple[str, dict[str, Tensor]]:
    """The strategy and per-image parameters for `n` images, as CPU tensors (two-value parameters are (2, n)).

    Flip and rotate numbers are drawn on every call, whichever strategy wins: the generator then advances by an
    amount that depends only on the batch size and the listed strategies, so the streams of later batches do not
    hinge on which strategy an earlier batch drew. The other strategies draw only when listed, after them, so a
    flip/rotate configuration consumes the generator exactly as it always has.
    """
    choice = int(torch.randint(len(cfg.strategies), (1,), generator=generator).item())
    flip_draws = torch.rand(n, generator=generator)
    angle_draws = torch.rand(n, generator=generator)
    p = {"flip": flip_draws < 0.5, "degrees": (2.0 * angle_draws - 1.0) * cfg.rotate_degrees}
    listed = set(cfg.strategies)
    if "color" in listed:
        u = torch.rand(3, n, generator=generator)
        p["brightness"] = (u[0] - 0.5) * cfg.brightness
        p["saturation"] = u[1] * cfg.saturation
        p["contrast"] = u[2] + cfg.contrast
    if "crop" in listed:
        p["shift"] = 2.0 * torch.rand(2, n, generator=generator) - 1.0
    if "cutout" in listed:
        p["cutout_at"] = torch.rand(2, n, generator=generator)
    if "scale" in listed:
        low = 1.0 / cfg.scale_ratio
        p["scale"] = low + torch.rand(2, n, generator=generator) * (cfg.scale_ratio - low)
    # Identity values for the unlisted strategies, so every caller sees the same keys.
    p.setdefault("brightness", torch.zeros(n))
    p.setdefault("saturation", torch.ones(n))
    p.setdefault("contrast", torch.ones(n))
    p.setdefault("shift", torch.zeros(2, n))
    p.setdefault("cutout_at", torch.full((2, n), 0.5))
    p.setdefault("scale", torch.ones(2, n))
    return cfg.strategies[choice], p


def _apply(x: Tensor, strategy: str, p: dict[str, Tensor], crop_pad: float, cutout_size: float) -> Tensor:
    """Apply `strategy` with the per-image parameters `p` (as `_draw` returns them) to `x`."""
    if strategy == "flip":
        return _flip(x, p["flip"])
    if strategy == "rotate":
        return _rotate(x, p["degrees"])
    if strategy == "color":
        return _color(x, p["brightness"], p["saturation"], p["contrast"])
    if strategy == "crop":
        return _crop(x, p["shift"][0], p["shift"][1], crop_pad)
    if strategy == "cutout":
        return _cutout(x, p["cutout_at"][0], p["cutout_at"][1], cutout_size)
    if strategy == "scale":
        return _scale(x, p["scale"][0], p["scale"][1])
    raise ValueError(f"augment: unknown strategy {strategy!r}; choose one of {', '.join(AUGMENTATIONS)}")


def _per_image(values: Tensor, x: Tensor) -> Tensor:
    """(N,) values as (N, 1, 1, 1) of x's dtype and device, to broadcast over images."""
    return values.to(dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)


def _flip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror along the width the images whose `mask` entry is True."""
    mask = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)


def _color(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    """Brightness (added), saturation (about the mean over channels), contrast (about the image's mean), in turn."""
    x = x + _per_image(brightness, x)
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * _per_image(saturation, x) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * _per_image(contrast, x) + image_mean


def _whole_pixels(fraction: Tensor, largest: int) -> Tensor:
    """Map fractions in [-1, 1] onto the 2 * largest + 1 shifts -largest..largest, each an equal share of [-1, 1)."""
    choices = 2 * largest + 1
    index = ((fraction.to(torch.float64) + 1.0) / 2.0 * choices).floor().clamp(0, choices - 1)
    return index.long() - largest


def _crop(x: Tensor, down: Tensor, right: Tensor, crop_pad: float) -> Tensor:
    """Translate each image by whole pixels (fractions of the largest shift, round(crop_pad x size)); zero fill."""
    n, c, h, w = x.shape
    dy = _whole_pixels(down, int(h * crop_pad + 0.5)).to(x.device).view(-1, 1)
    dx = _whole_pixels(right, int(w * crop_pad + 0.5)).to(x.device).view(-1, 1)
    rows = torch.arange(h, device=x.device) - dy  # the source row of each output row, (N, H)
    cols = torch.arange(w, device=x.device) - dx  # (N, W)
    inside = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, 1, w)
    index = rows.clamp(0, h - 1).view(n, h, 1) * w + cols.clamp(0, w - 1).view(n, 1, w)
    moved = x.flatten(2).gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    return torch.where(inside, moved, torch.zeros((), dtype=x.dtype, device=x.device))


def _cutout(x: Tensor, centre_row: Tensor, centre_col: Tensor, cutout_size: float) -> Tensor:
    """Zero a square of side round(cutout_size x size) centred on pixel (floor(row x H), floor(col x W))."""
    n, _, h, w = x.shape
    side_h, side_w = int(h * cutout_size + 0.5), int(w * cutout_size + 0.5)
    top = (centre_row.to(torch.float64) * h).floor().long().clamp(0, h - 1).to(x.device).view(-1, 1) - side_h // 2
    left = (centre_col.to(torch.float64) * w).floor().long().clamp(0, w - 1).to(x.device).view(-1, 1) - side_w // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = ((rows >= top) & (rows < top + side_h)).view(n, 1, h, 1)
    in_cols = ((cols >= left) & (cols < left + side_w)).view(n, 1, 1, w)
    return torch.where(in_rows & in_cols, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _scale(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Resample each image at its row and column coordinates times its own factors (about the centre)."""
    theta = torch.zeros(x.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cols.to(torch.float64)
    theta[:, 1, 1] = rows.to(torch.float64)
    return _sample(x, theta)


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
    return _sample(x, theta)


def _sample(x: Tensor, theta: Tensor) -> Tensor:
    """Bilinear resampling of each image through its affine map `theta` (N, 2, 3) from output to source
    coordinates, normalised to [-1, 1]; zero outside the source image."""
    theta = theta.to(dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
