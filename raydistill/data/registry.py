"""Data sets: a registry of raw loaders and `load_dataset`, which turns one into normalised train/val/test tensors.

A raw loader reads files only (no downloads, no disk cache) and returns uint8 images (N, C, H, W), int64 labels and
class names. `load_dataset` then scales to [0, 1], holds a seeded validation split out of the training images,
normalises every split with the training split's per-channel statistics and optionally ZCA-whitens them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from raydistill.config import ConfigError, DataConfig
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
    """Normalised splits ready for training: float32 images (N, C, H, W), int64 labels."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
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
    train_x, val_x, test_x = (_to_unit(raw.train_x[train_idx]), _to_unit(raw.train_x[val_idx]), _to_unit(raw.test_x))
    train_y, val_y = raw.train_y[train_idx], raw.train_y[val_idx]

    mean, std = _channel_stats(train_x)
    train_x, val_x, test_x = (_normalise(t, mean, std) for t in (train_x, val_x, test_x))

    zca = None
    if cfg.zca:
        zca = ZCA.fit(train_x, cfg.zca_reg)
        train_x, val_x, test_x = (_zca_in_blocks(zca, t) for t in (train_x, val_x, test_x))

    return Dataset(
        name=cfg.name,
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=raw.test_y,
        class_names=list(raw.class_names),
        mean=mean.tolist(),
        std=std.tolist(),
        zca=zca,
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


def _to_unit(x: Tensor) -> Tensor:
    return x.to(torch.float32).div_(255.0)


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over (N, H, W)."""
    std, mean = torch.std_mean(x, dim=(0, 2, 3))
    # A constant channel (e.g. a blank test fixture) would divide by zero; leave it centred but unscaled.
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def _zca_in_blocks(zca: ZCA, x: Tensor, block: int = 8192) -> Tensor:
    """Whiten a split block by block so the temporary (centred) copy stays small."""
    if x.shape[0] == 0:
        return x
    return torch.cat([zca.transform(b) for b in x.split(block)])
