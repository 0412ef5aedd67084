"""ZCA whitening fitted on a training split (the KIP / FRePo preprocessing).

The whitening matrix is W = U diag(1 / sqrt(eig + ridge)) U^T with ridge = reg * mean(eig): regularising relative to
the mean eigenvalue makes `reg` mean the same thing for every data set and image size. W is symmetric, so the
whitened image is (x - mean) W and the exact inverse is y U diag(sqrt(eig + ridge)) U^T + mean.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Rows per block when accumulating the covariance: bounds the extra memory to one block, not one training split.
_BLOCK = 8192


class ZCA:
    """A fitted ZCA transform over flattened images; build it with `ZCA.fit` or `ZCA.from_arrays`."""

    def __init__(self, mean: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, ridge: float):
        self.mean = mean.double()  # (D,)
        self.eigenvalues = eigenvalues.double()  # (D,), clamped >= 0
        self.eigenvectors = eigenvectors.double()  # (D, D), columns are eigenvectors
        self.ridge = float(ridge)  # absolute amount added to every eigenvalue
        scale = (self.eigenvalues + self.ridge).sqrt()
        u = self.eigenvectors
        self._whiten = (u / scale) @ u.T
        self._unwhiten = (u * scale) @ u.T
        self._cast: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    @classmethod
    def fit(cls, x: Tensor, reg: float) -> ZCA:
        """Fit on images `x` (N, C, H, W); `reg` > 0 is the ridge as a multiple of the mean eigenvalue."""
        if reg <= 0:
            raise ValueError(f"ZCA reg must be > 0, got {reg}")
        if x.shape[0] < 2:
            raise ValueError(f"ZCA needs at least 2 images to estimate a covariance, got {x.shape[0]}")
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(dim=0, dtype=torch.float64)
        cov = _covariance(flat, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        # Round-off leaves the smallest eigenvalues slightly negative; the covariance is PSD.
        eigenvalues = eigenvalues.clamp_min(0.0)
        ridge = reg * eigenvalues.mean().item()
        if ridge == 0.0:
            raise ValueError("ZCA fit: every image is identical (zero covariance); nothing to whiten")
        return cls(mean, eigenvalues, eigenvectors, ridge)

    @property
    def num_features(self) -> int:
        return self.mean.numel()

    def transform(self, x: Tensor) -> Tensor:
        """Whiten images (N, ...) with N * prod(...) matching the fitted feature count; differentiable in x."""
        mean, whiten, _ = self._matrices(x)
        flat = x.reshape(x.shape[0], -1)
        return ((flat - mean) @ whiten).reshape(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """Undo `transform` exactly (up to floating-point round-off)."""
        mean, _, unwhiten = self._matrices(x)
        flat = x.reshape(x.shape[0], -1)
        return (flat @ unwhiten + mean).reshape(x.shape)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain float64 arrays for `np.savez` (no pickle); `from_arrays` rebuilds the same transform."""
        return {
            "mean": self.mean.numpy(),
            "eigenvalues": self.eigenvalues.numpy(),
            "eigenvectors": self.eigenvectors.numpy(),
            "ridge": np.asarray(self.ridge, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ZCA:
        """Inverse of `to_arrays`; accepts the mapping returned by `np.load` on an .npz file."""
        missing = [k for k in ("mean", "eigenvalues", "eigenvectors", "ridge") if k not in arrays]
        if missing:
            raise ValueError(f"ZCA arrays: missing {', '.join(missing)}; save them with ZCA.to_arrays()")
        return cls(
            torch.from_numpy(np.asarray(arrays["mean"])),
            torch.from_numpy(np.asarray(arrays["eigenvalues"])),
            torch.from_numpy(np.asarray(arrays["eigenvectors"])),
            float(np.asarray(arrays["ridge"])),
        )

    def _matrices(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """mean, W and W^-1 in x's dtype and device, cast once per (dtype, device) and reused."""
        if x[0].numel() != self.num_features:
            raise ValueError(
                f"ZCA was fitted on {self.num_features} features per image, got images of shape {tuple(x.shape[1:])}"
            )
        key = (x.dtype, x.device)
        if key not in self._cast:
            matrices = (self.mean, self._whiten, self._unwhiten)
            self._cast[key] = tuple(t.to(dtype=x.dtype, device=x.device) for t in matrices)
        return self._cast[key]


def _covariance(flat: Tensor, mean: Tensor) -> Tensor:
    """Sample covariance (D, D) in float64, accumulated block by block.

    Each block's product runs in the input dtype (float32 GEMM is ~4x faster than float64 on CPU and the centred
    values are well scaled); the sum over blocks is kept in float64 so large training splits lose no precision.
    """
    mean_in = mean.to(flat.dtype)
    cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
    for block in flat.split(_BLOCK):
        centred = block - mean_in
        cov += (centred.T @ centred).double()
    return cov / (flat.shape[0] - 1)
