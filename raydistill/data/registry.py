"""Data sets: a registry of raw loaders and `load_dataset`, which turns one into train/val/test splits.

A raw loader reads files only (no downloads, no disk cache) and returns uint8 images (N, C, H, W), int64 labels and
class names. `load_dataset` holds a seeded validation split out of the training images and fits the normalisation:
the training split's per-channel statistics and optionally a ZCA transform. The splits stay uint8
(raydistill.data.real.RealImages): a batch is scaled to [0, 1], standardised and whitened when it is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from raydistill.config import ConfigError, DataConfig
from raydistill.data.real import Normaliser, RealImages
from raydistill.data.zca import ZCA


class DataError(ValueError):
    """A data file exists but cannot be read (truncated, corrupt or not the expected format); names the file."""


@dataclass
class RawData:
    """What a raw loader returns: uint8 images (N, C, H, W), int64 labels, class names indexed by label."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    class_names: list[str]


RawLoader = Callable[[Path, DataConfig], RawData]

DATASETS: dict[str, RawLoader] = {}
_DEFAULT_ROOTS: dict[str, str | None] = {}


def register_dataset(name: str, default_root: str | None = None) -> Callable[[RawLoader], RawLoader]:
    """Register `loader(root, cfg) -> RawData` under `name`; `default_root` is used when data.root is unset."""

    def decorate(loader: RawLoader) -> RawLoader:
        DATASETS[name] = loader
        _DEFAULT_ROOTS[name] = default_root
        return loader

    return decorate


def default_root(name: str) -> str | None:
    """Where data set `name` lives when data.root is not set (None: it has no default location)."""
    return _DEFAULT_ROOTS.get(name)


# ---------------------------------------------------------------------------------------------- the Dataset


@dataclass
class Dataset:
    """The splits: images (N, C, H, W) that index as normalised float32 (uint8 RealImages, or float32 tensors
    where a caller substitutes them), int64 labels."""

    name: str
    train_x: RealImages | Tensor
    train_y: Tensor
    val_x: RealImages | Tensor
    val_y: Tensor
    test_x: RealImages | Tensor
    test_y: Tensor
    class_names: list[str]
    mean: list[float]  # per channel, training split, [0, 1] scale
    std: list[float]
    zca: ZCA | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.train_x.shape[1:])

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def normaliser(self) -> Normaliser:
        return Normaliser(torch.tensor(self.mean, dtype=torch.float32), torch.tensor(self.std, dtype=torch.float32),
                          self.zca)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load `cfg.name` from `cfg.root` (or its default location) and preprocess it; see the module docstring."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: unknown value {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    root = resolve_root(cfg)
    raw = DATASETS[cfg.name](root, cfg)

    n = raw.train_x.shape[0]
    if cfg.val_size >= n:
        raise ConfigError(
            f"data.val_size: {cfg.val_size} leaves no training images ({n} in {cfg.name}); set data.val_size < {n}"
        )
    train_idx, val_idx = split_indices(n, cfg.val_size, cfg.split_seed)
    train_px, val_px = raw.train_x[train_idx], raw.train_x[val_idx]
    mean, std = channel_stats(train_px)
    normaliser = Normaliser(mean, std)
    if cfg.zca:  # fitted on the standardised training split, converted block by block
        normaliser.zca = ZCA.fit(_standardised(train_px, normaliser), cfg.zca_reg)

    return Dataset(
        name=cfg.name,
        train_x=RealImages(train_px, normaliser),
        train_y=raw.train_y[train_idx],
        val_x=RealImages(val_px, normaliser),
        val_y=raw.train_y[val_idx],
        test_x=RealImages(raw.test_x.contiguous(), normaliser),
        test_y=raw.test_y,
        class_names=list(raw.class_names),
        mean=mean.tolist(),
        std=std.tolist(),
        zca=normaliser.zca,
    )


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) indices into n training images: a seeded random `val_size` are held out, each part sorted."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    # Sorted so both splits keep the files' order; samplers shuffle anyway, and the sets are what the seed fixes.
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def resolve_root(cfg: DataConfig) -> Path:
    """The data set's folder (data.root or its default); a missing one is a ConfigError naming the fix."""
    root = cfg.root if cfg.root is not None else default_root(cfg.name)
    if root is None:
        raise ConfigError(f"data.root: data set {cfg.name!r} has no default location; set data.root=/path/to/data")
    if "://" in str(root):  # a URI (data.name: parquet): its loader opens cfg.root through pyarrow's filesystems
        return Path(root)  # (a Path folds the '//': a loader that takes URIs reads cfg.root itself)
    if not Path(root).exists():
        raise ConfigError(f"data.root: {root} does not exist; {install_hint(cfg)}")
    return Path(root)


def install_hint(cfg: DataConfig) -> str:
    if cfg.name == "fashion-mnist" and cfg.root is None:
        return "install it with 'apt-get install -y dataset-fashion-mnist' or set data.root=DIR holding its idx files"
    return "point data.root at the directory that holds the data set"


def channel_stats(pixels: Tensor, block: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased std over (N, H, W) of uint8 pixels, in [0, 1] units (float32).

    Exact and small: a histogram of the 256 values per channel, counted `block` pixels at a time (no float or int64
    copy of the split), gives the sums of the values and of their squares as integers.
    """
    c = pixels.shape[1]
    counts = torch.zeros(c, 256, dtype=torch.int64)
    rows = max(1, block // max(1, pixels[0].numel()))
    for b in pixels.split(rows):
        for ch in range(c):
            counts[ch] += torch.bincount(b[:, ch].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.int64)
    total, squares = counts @ values, counts @ (values * values)
    count = pixels.numel() // c if c else 0
    mean = total.double() / max(count, 1)
    var = (squares.double() - total.double() * mean) / max(count - 1, 1)
    mean, std = mean / 255.0, var.clamp_min(0).sqrt() / 255.0
    # A constant channel (e.g. a blank test fixture) would divide by zero; leave it centred but unscaled.
    return mean.float(), torch.where(std > 0, std, torch.ones_like(std)).float()


def _standardised(pixels: Tensor, normaliser: Normaliser, block: int = 8192) -> Tensor:
    """The whole split standardised (no ZCA) as float32: what a ZCA fit needs."""
    plain = Normaliser(normaliser.mean, normaliser.std)
    return torch.cat([plain(b) for b in pixels.split(block)]) if pixels.shape[0] else plain(pixels)
