"""The closed form every kernel ridge regression method shares: predict the target batch from the support set.

    predictions = K_ts (K_ss + reg x mean(diag K_ss) x I)^-1 Y_s

K_ss is the support (synthetic) set's kernel, K_ts the target (real) batch's kernel against it, and Y_s the support
labels. The regulariser is relative, scaled by the mean of K_ss's diagonal (trace / n) as the FRePo, RFAD and KIP
codes scale theirs, so the same `reg` suits any kernel's scale and the predictions do not change when the kernel is
multiplied by a constant. The system is solved by Cholesky (K_ss is symmetric positive semi-definite, and the
regulariser makes it definite); with `float64` the kernels are cast and the solve accumulates in float64, and the
predictions come back in the kernels' dtype. Gradients flow through K_ss, K_ts and Y_s (torch.linalg.cholesky and
cholesky_solve are differentiable).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from raydistill.config.errors import ConfigError


class SingularKernelError(ConfigError):
    """The regularised support kernel is not positive definite: the run cannot go on with these settings."""


def krr_predict(k_ss: Tensor, k_ts: Tensor, y_s: Tensor, reg: float, float64: bool = True) -> Tensor:
    """K_ts (K_ss + reg x trace(K_ss) / n x I)^-1 Y_s, by Cholesky; (targets, outputs) in k_ts's dtype."""
    if reg <= 0 or reg != reg:
        raise ValueError(f"reg must be > 0, got {reg}")
    dtype = k_ts.dtype
    if float64:
        k_ss, k_ts, y_s = k_ss.double(), k_ts.double(), y_s.double()
    n = k_ss.shape[0]
    k_ss = 0.5 * (k_ss + k_ss.T)  # exactly symmetric: rounding in a product of features can leave it off by an ulp
    scale = torch.diagonal(k_ss).mean()
    value = float(scale.detach())
    eye = torch.eye(n, dtype=k_ss.dtype, device=k_ss.device)
    chol, info = torch.linalg.cholesky_ex(k_ss + (reg * scale) * eye)
    if int(info) != 0 or not math.isfinite(value) or value <= 0:
        raise SingularKernelError(
            f"krr: the support kernel ({n} x {n}, mean diagonal {value:.3g}) is singular even with the "
            f"regulariser {reg:g} x its mean diagonal; raise the method's reg (e.g. to {max(reg * 100, 1e-4):g}), "
            "or use float64: true, or check the synthetic images for NaN or all-zero features")
    alpha = torch.cholesky_solve(y_s, chol)
    return (k_ts @ alpha).to(dtype)


def centred_targets(labels: Tensor, num_classes: int) -> Tensor:
    """Regression targets from one-hot (or learned, non-negative) label rows: centred by 1/C and scaled by
    1/sqrt(C/10), FRePo's targets (so ten classes give 0.9 and -0.1)."""
    return (labels - 1.0 / num_classes) / (num_classes / 10) ** 0.5


def mse_loss(predictions: Tensor, targets: Tensor) -> Tensor:
    """0.5 x the mean squared error over every element (RFAD's and KIP's form)."""
    return 0.5 * (predictions - targets).pow(2).mean()


def platt_loss(predictions: Tensor, hard_labels: Tensor, log_temperature: Tensor) -> Tensor:
    """RFAD's Platt-scaled loss: cross-entropy of exp(t) x predictions, t a learned log temperature."""
    return torch.nn.functional.cross_entropy(log_temperature.exp() * predictions, hard_labels)
