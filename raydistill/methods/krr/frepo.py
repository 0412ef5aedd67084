"""FRePo as a Method (Zhou, Nezhadarya & Ba, "Dataset Distillation using Neural Feature Regression", NeurIPS 2022).

The loss: kernel ridge regression on the features (`model.features`) of one network from a model pool, the linear
kernel K = F F^T, predicting the target batch's centred one-hot labels from the synthetic set's (learned) labels,
with the mean squared error.

The pool. FRePo keeps `pool_size` networks alive; each step it trains one of them one more step on the current
synthetic set and resets a network once it has had `max_online_steps` updates. Here the pool is *seeded*: member m
(drawn per task) ages in step with the run, its age at step s being (s + m x max_online_steps / pool_size) modulo
max_online_steps, so the members stay staggered across the age range as in a steady-state pool, and its
initialisation is seeded by (run seed, m, how many times it has been reset). A task rebuilds its member from that
initialisation and trains it `age` steps (Adam at lr_net, batches of batch_train synthetic images, the run's
augmentation, mean squared error on the same targets) on the current snapshot, without a graph into the images. So a
task stays a pure function of (snapshot, step, slot) and a retried task computes the same gradient.

What differs from FRePo: the member is trained on the current snapshot rather than on the snapshots along its life,
and a task costs on average (max_online_steps - 1) / 2 network steps instead of one (the `net_seconds` statistic
measures it). Not carried over: FRePo's flipped copies of the support set and its margin penalty on learned labels.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from raydistill.config.schema import DistillConfig
from raydistill.data.augment import augment
from raydistill.methods.krr.common import KrrContext, KrrMethod, derived_seed, feature_kernels, solve_dtype
from raydistill.methods.krr.config import FrepoConfig, validate_frepo
from raydistill.methods.krr.solver import centred_targets, mse_loss
from raydistill.models.registry import network_from_seed

POOL_TAG = 0x46526550  # separates pool seeds from task seeds


def member_age(section: FrepoConfig, member: int, step: int) -> tuple[int, int]:
    """(age, generation) of pool member `member` at meta-step `step`: its age in [0, max_online_steps) and how many
    times it has been reset."""
    span = section.max_online_steps
    position = step + member * span // section.pool_size
    return position % span, position // span


def train_member(model: torch.nn.Module, images: Tensor, targets: Tensor, section: FrepoConfig, steps: int,
                 rng: torch.Generator, aug) -> None:
    """`steps` Adam steps (lr_net) on random batches of the synthetic set, MSE on `targets`, no graph into it."""
    if steps <= 0:
        return
    images, targets = images.detach(), targets.detach()
    opt = torch.optim.Adam(model.parameters(), lr=section.lr_net)
    n = images.shape[0]
    batch = min(section.batch_train, n)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(n, generator=rng)[:batch].to(images.device)
        x = images[idx] if aug is None else augment(images[idx], rng, aug)
        loss = mse_loss(model(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


class Frepo(KrrMethod):
    """FRePo: neural feature regression with a (seeded) model pool."""

    name = "frepo"
    config_cls = FrepoConfig

    def check(self, section: FrepoConfig, cfg: DistillConfig) -> None:
        validate_frepo(section)

    def kernels(self, ctx: KrrContext, images: Tensor, labels: Tensor, real: Tensor, step: int,
                rng: torch.Generator) -> tuple[Tensor, Tensor, dict]:
        section: FrepoConfig = ctx.cfg.method_config
        member = int(torch.randint(0, section.pool_size, (1,), generator=rng))
        age, generation = member_age(section, member, step)
        model = network_from_seed(ctx.model_factory, derived_seed(ctx.cfg.seed, POOL_TAG, member, generation))
        model = model.to(device=images.device, dtype=images.dtype)
        start = time.perf_counter()
        targets = centred_targets(labels.detach(), ctx.num_classes)
        aug = ctx.cfg.augment if ctx.cfg.augment.strategies else None
        train_member(model, images, targets, section, age, rng, aug)
        net_s = time.perf_counter() - start
        model.eval().requires_grad_(False)
        k_ss, k_ts, _ = feature_kernels(lambda x: model.features(x).flatten(1), images, real, solve_dtype(section, images))
        return k_ss, k_ts, {"member": member, "age": age, "net_seconds": round(net_s, 4)}

    def describe(self, s: FrepoConfig) -> str:
        return (f"frepo pool={s.pool_size} max_online_steps={s.max_online_steps} lr_net={s.lr_net} "
                f"batch_real={s.batch_real} reg={s.reg:g}")
