"""The config sections of the kernel ridge regression methods (`frepo:`, `rfad:`, `kip:`) and their checks.

Every section shares the closed form's settings (KrrConfig): the regulariser `reg`, scaled by the mean of the
support kernel's diagonal as the FRePo, RFAD and KIP codes do; float64 for the solve; the real (target) batch of a
task; and the loss. The defaults are the published settings where they exist; the presets comment each number with
its source.
"""

from __future__ import annotations

from dataclasses import dataclass

from raydistill.config.checks import choice, positive
from raydistill.config.errors import ConfigError

LOSSES = ("mse", "platt")  # mse: 0.5 x mean squared error on centred one-hot targets; platt: RFAD's scaled CE


@dataclass
class KrrConfig:
    reg: float = 1e-6  # lambda, relative: K_ss + reg x trace(K_ss) / n x I (FRePo's and KIP's 1e-6)
    float64: bool = True  # solve (and form the kernels) in float64; the features stay in the run's dtype
    batch_real: int = 1024  # real images per task: the target batch the support set must predict
    loss: str = "mse"  # mse (FRePo, KIP) or platt (RFAD: cross-entropy on exp(t) x predictions, t learned)
    platt_lr_scale: float = 10.0  # platt: the temperature's meta lr is meta.lr x this (RFAD: 1e-2 against 1e-3)


@dataclass
class FrepoConfig(KrrConfig):
    pool_size: int = 10  # pool members (FRePo's num_nn_state); each is a seeded initialisation, reset when it ages out
    max_online_steps: int = 100  # a member's age range: it is trained 0 .. max_online_steps - 1 steps (FRePo's reset)
    lr_net: float = 3e-4  # Adam on the pool networks (FRePo's online optimizer)
    batch_train: int = 1000  # synthetic images per pool-network step (FRePo: min(1000, set size), its eval_batch_size)


@dataclass
class RfadConfig(KrrConfig):
    models: int = 8  # M random, untrained ConvNets whose features are concatenated (RFAD's n_models)
    batch_real: int = 5120  # RFAD: n_batches 4 x 1280 real images
    reg: float = 5e-3  # RFAD's jit default
    loss: str = "platt"  # RFAD's platt-scaled cross-entropy; mse as an option
    nngp_init: bool = True  # RFAD's NNGP parameterisation: weights N(0, 2 / fan_in), biases N(0, 0.1^2)


@dataclass
class KipConfig(KrrConfig):
    models: int = 1  # networks per task whose empirical NTKs are averaged
    batch_real: int = 1000  # target images per task
    output_projections: int = 0  # 0: the NTK traced over every output (exact); k: over k random orthonormal output
    # directions drawn per task, an unbiased sketch of the same kernel whose Jacobians are k / classes the size


def validate_krr(section: KrrConfig, name: str) -> None:
    positive(section.reg, f"{name}.reg")
    positive(section.batch_real, f"{name}.batch_real")
    choice(section.loss, LOSSES, f"{name}.loss")
    positive(section.platt_lr_scale, f"{name}.platt_lr_scale")


def validate_frepo(section: FrepoConfig) -> None:
    validate_krr(section, "frepo")
    positive(section.pool_size, "frepo.pool_size")
    if section.max_online_steps < 1:
        raise ConfigError(f"frepo.max_online_steps: must be >= 1 (a member is trained 0 .. max_online_steps - 1 "
                          f"steps), got {section.max_online_steps}")
    positive(section.lr_net, "frepo.lr_net")
    positive(section.batch_train, "frepo.batch_train")


def validate_rfad(section: RfadConfig) -> None:
    validate_krr(section, "rfad")
    positive(section.models, "rfad.models")


def validate_kip(section: KipConfig) -> None:
    validate_krr(section, "kip")
    positive(section.models, "kip.models")
    if section.output_projections < 0:
        raise ConfigError(f"kip.output_projections: must be >= 0 (0: every output), got {section.output_projections}")
