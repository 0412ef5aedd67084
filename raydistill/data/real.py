"""Real images that stay uint8 until a batch is drawn.

`RealImages` holds a split as uint8 pixels (one tensor, or several chunks read in place from Ray's object store)
and a `Normaliser` (the training split's per-channel mean and std, and the ZCA transform when data.zca is on).
Indexing it returns float32 normalised images on the pixels' device: `images[idx]` is what a float32 copy of the
whole split indexed at `idx` used to be, bit for bit without ZCA (the same operations in the same order), so a
worker holds a quarter of the bytes and converts only the batch it draws.

It stands where a float32 tensor stood: `shape`, `device`, `dtype`, `len()`, `to(device)`, indexing with a
slice, an integer tensor or a list. `tensor()` converts the whole split (tests, small sets).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from raydistill.data.zca import ZCA


@dataclass
class Normaliser:
    """uint8 pixels -> [0, 1] -> per-channel standardised -> (optionally) ZCA-whitened float32."""

    mean: Tensor  # (C,) float32, training split, [0, 1] units
    std: Tensor  # (C,) float32; 1 for a constant channel
    zca: ZCA | None = None

    def __call__(self, pixels: Tensor) -> Tensor:
        x = pixels.to(torch.float32).div_(255.0)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
        if self.zca is not None and x.shape[0] > 0:
            x = self.zca.transform(x)
        return x

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (what crosses process boundaries; no pickled objects)."""
        out = {"mean": self.mean.numpy(), "std": self.std.numpy()}
        if self.zca is not None:
            out.update({f"zca_{k}": v for k, v in self.zca.to_arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Normaliser:
        arrays = {k: np.array(v) for k, v in arrays.items()}  # own copies: object-store arrays are read-only
        zca = None
        if "zca_mean" in arrays:
            zca = ZCA.from_arrays({k[4:]: v for k, v in arrays.items() if k.startswith("zca_")})
        return cls(torch.from_numpy(arrays["mean"]), torch.from_numpy(arrays["std"]), zca)


def pixels_from_numpy(array: np.ndarray) -> Tensor:
    """A uint8 tensor over `array` without copying it, also when the array is a read-only view into Ray's object
    store (the tensor is only ever read: indexing makes new tensors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "the given NumPy array is not writable"
        return torch.from_numpy(array)


class RealImages:
    """A split's uint8 pixels (N, C, H, W), in one or more chunks, read as normalised float32 batches."""

    def __init__(self, chunks: Tensor | list[Tensor], normaliser: Normaliser):
        chunks = [chunks] if isinstance(chunks, Tensor) else list(chunks)
        if not chunks:
            raise ValueError("RealImages needs at least one chunk of pixels")
        if any(c.dtype != torch.uint8 for c in chunks) or len({tuple(c.shape[1:]) for c in chunks}) != 1:
            raise ValueError("RealImages chunks must be uint8 tensors (n, C, H, W) of one image shape")
        self.chunks = chunks
        self.normaliser = normaliser
        sizes = torch.tensor([c.shape[0] for c in chunks])
        self._starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])  # chunk i: [s_i, s_i+1)

    # ------------------------------------------------------------------------------------------ tensor-like

    @property
    def shape(self) -> torch.Size:
        return torch.Size([int(self._starts[-1]), *self.chunks[0].shape[1:]])

    @property
    def device(self) -> torch.device:
        return self.chunks[0].device

    dtype = torch.float32  # what indexing returns

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held (uint8)."""
        return sum(c.numel() for c in self.chunks)

    def __len__(self) -> int:
        return self.shape[0]

    def to(self, device: torch.device | str) -> RealImages:
        """The same images with their uint8 pixels on `device` (no copy when they are there already)."""
        return RealImages([c.to(device) for c in self.chunks], self.normaliser)

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, tuple):  # rows first, then the rest on the normalised batch
            return self[index[0]][(slice(None), *index[1:])]
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        return self.normaliser(self.pixels(index))

    def tensor(self) -> Tensor:
        """The whole split as one normalised float32 tensor."""
        return self[:]

    # ------------------------------------------------------------------------------------------ pixels

    def pixels(self, index) -> Tensor:
        """The uint8 pixels at `index` (a slice, an integer tensor or a list of integers), in that order."""
        if len(self.chunks) == 1:
            return self.chunks[0][index]
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        if index.ndim != 1:
            raise IndexError("RealImages takes a slice or a one-dimensional index")
        n = len(self)
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"index out of range for {n} images")
        index = torch.where(index < 0, index + n, index)
        which = torch.searchsorted(self._starts[1:], index, right=True)  # the chunk each row lives in
        out = torch.empty((index.numel(), *self.chunks[0].shape[1:]), dtype=torch.uint8, device=self.device)
        for c in torch.unique(which).tolist():
            rows = torch.nonzero(which == c).flatten()
            local = (index[rows] - self._starts[c]).to(self.device)
            out[rows.to(self.device)] = self.chunks[c][local]
        return out

