"""RFAD as a Method (Loo, Hasani, Amini & Rus, "Efficient Dataset Distillation using Random Feature Approximation",
NeurIPS 2022).

The kernel: a random-feature approximation of the ConvNet's NNGP kernel. `models` random, untrained networks (the
run's model, which RFAD uses without normalisation and twice the width) featurise both sets; their flattened
features (`model.features`) are concatenated and scaled by 1 / sqrt(models x features), and
K(x, x') = 2 <phi(x), phi(x')> + 0.01, the ReLU NNGP's weight and bias variances as RFAD's code writes them. With
`nngp_init` each network is drawn in the NNGP parameterisation (weights N(0, 2 / fan_in), biases N(0, 0.1^2)),
as RFAD draws them; otherwise with PyTorch's default initialisation. Nothing is trained.

The loss: RFAD's Platt-scaled cross-entropy (loss: platt), CE(exp(t) x predictions, labels) with t a learned log
temperature, or the mean squared error on the centred one-hot targets (loss: mse). Fresh networks per task (RFAD's
schedule draws new ones every iteration), from the task's generator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from raydistill.config.schema import DistillConfig
from raydistill.methods.krr.common import KrrContext, KrrMethod, feature_kernels, solve_dtype
from raydistill.methods.krr.config import RfadConfig, validate_rfad
from raydistill.models.registry import network_from_seed

WEIGHT_VARIANCE, BIAS_VARIANCE = 2.0, 0.01  # K = 2 <phi, phi'> + 0.01 (RFAD's distillation.py)
NNGP_BIAS_STD = 0.1


def nngp_init_(model: nn.Module, rng: torch.Generator) -> None:
    """RFAD's NNGP parameterisation, drawn from `rng`: every conv and linear weight N(0, 2 / fan_in), bias
    N(0, 0.1^2)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                w = module.weight
                fan_in = w[0].numel()
                w.copy_(torch.randn(w.shape, generator=rng, dtype=w.dtype) * math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    b = module.bias
                    b.copy_(torch.randn(b.shape, generator=rng, dtype=b.dtype) * NNGP_BIAS_STD)


def random_features(models: list[nn.Module], x: Tensor) -> Tensor:
    """The concatenated flattened features of `models`, scaled by 1 / sqrt(total features)."""
    feats = torch.cat([m.features(x).flatten(1) for m in models], dim=1)
    return feats / math.sqrt(feats.shape[1])


class Rfad(KrrMethod):
    """RFAD: kernel ridge regression on random ConvNet features (no training)."""

    name = "rfad"
    config_cls = RfadConfig

    def check(self, section: RfadConfig, cfg: DistillConfig) -> None:
        validate_rfad(section)

    def kernels(self, ctx: KrrContext, images: Tensor, labels: Tensor, real: Tensor, step: int,
                rng: torch.Generator) -> tuple[Tensor, Tensor, dict]:
        section: RfadConfig = ctx.cfg.method_config
        models = []
        for _ in range(section.models):
            model = network_from_seed(ctx.model_factory, int(torch.randint(0, 2**62, (1,), generator=rng)))
            if section.nngp_init:
                nngp_init_(model, rng)
            models.append(model.to(device=images.device, dtype=images.dtype).eval().requires_grad_(False))
        k_ss, k_ts, features = feature_kernels(lambda x: random_features(models, x), images, real,
                                               solve_dtype(section, images))
        return WEIGHT_VARIANCE * k_ss + BIAS_VARIANCE, WEIGHT_VARIANCE * k_ts + BIAS_VARIANCE, {"features": features}

    def describe(self, s: RfadConfig) -> str:
        return f"rfad models={s.models} loss={s.loss} batch_real={s.batch_real} reg={s.reg:g}"
