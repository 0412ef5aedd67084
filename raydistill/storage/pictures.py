"""Pictures of a synthetic set: training-space images made viewable, in a grid with one column per class.

The run directory's grid.png and TensorBoard's image panel are the same picture (`grid_images` -> `grid_pixels`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from raydistill.data.registry import Dataset
from raydistill.storage.atomic import atomic_write_bytes
from raydistill.storage.store import Location


def to_display(images: Any, mean: Any, std: Any, zca_inverse: Callable | None = None) -> np.ndarray:
    """Training-space images (n, C, H, W) -> float32 numpy in [0, 1] for viewing.

    Applies `zca_inverse` first (it receives and returns an (n, C, H, W) array or tensor), then x * std + mean per
    channel, then clips.
    """
    x = images
    if zca_inverse is not None:
        x = zca_inverse(x)
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    channels = x.shape[1]
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float32).reshape(-1), (channels,)).reshape(1, -1, 1, 1)
    std = np.broadcast_to(np.asarray(std, dtype=np.float32).reshape(-1), (channels,)).reshape(1, -1, 1, 1)
    return np.clip(x.astype(np.float32) * std + mean, 0.0, 1.0)


def grid_pixels(images: np.ndarray, nrow: int, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Images (n, C, H, W) in [0, 1], C = 1 or 3, as one uint8 picture (height, width, C), `nrow` images per row.

    The picture is min(nrow, n) * (W + padding) + padding pixels wide and rows * (H + padding) + padding high.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"save_grid: expected non-empty (n, 1 or 3, H, W) images, got shape {images.shape}")
    if nrow < 1:
        raise ValueError(f"save_grid: nrow must be >= 1, got {nrow}")
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.float32)
    for i, img in enumerate(images):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[top : top + h, left : left + w] = img.transpose(1, 2, 0)
    return np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)


def save_grid(path: str | os.PathLike | Location, images: np.ndarray, nrow: int, padding: int = 2, pad_value: float = 1.0) -> None:
    """Write images (n, C, H, W) in [0, 1] as a PNG grid (see grid_pixels), atomically."""
    pixels = grid_pixels(images, nrow, padding, pad_value)
    c = pixels.shape[2]
    from PIL import Image  # only pictures need PIL

    picture = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def grid_images(images: torch.Tensor, labels: torch.Tensor, dataset: Dataset) -> np.ndarray:
    """Training-space images as viewable ones in grid order (one column per class), each stretched to [0, 1]."""
    zca_inverse = None if dataset.zca is None else (lambda x: dataset.zca.inverse(torch.as_tensor(x)).numpy())
    display = to_display(images.detach().float().cpu().numpy(), dataset.mean, dataset.std, zca_inverse)
    return stretch(display[grid_order(labels.cpu())])


def display_grid(images: torch.Tensor, labels: torch.Tensor, dataset: Dataset) -> np.ndarray:
    """The run's image grid as uint8 pixels (height, width, C): what grid.png shows, for TensorBoard."""
    return grid_pixels(grid_images(images, labels, dataset), nrow=dataset.num_classes)


def grid_order(labels: torch.Tensor) -> torch.Tensor:
    """One column per class, the k-th image of every class on row k."""
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        where = labels == c
        rank[where] = torch.arange(int(where.sum()))
    return torch.argsort(rank * (int(labels.max()) + 1) + labels)


def stretch(images: np.ndarray) -> np.ndarray:
    """Scale each image to its own [min, max]: distilled images often span a narrow range around the mean."""
    lo = images.min(axis=(1, 2, 3), keepdims=True)
    hi = images.max(axis=(1, 2, 3), keepdims=True)
    return (images - lo) / np.maximum(hi - lo, 1e-8)
