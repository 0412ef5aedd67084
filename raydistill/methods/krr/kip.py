"""KIP as a Method, with the empirical NTK of a finite-width network (after Nguyen, Chen & Lee, "Dataset
Meta-Learning from Kernel Ridge-Regression", ICLR 2021, and "Dataset Distillation with Infinitely Wide Convolutional
Networks", NeurIPS 2021).

This is the finite-width variant, not the paper's kernel: KIP uses the infinite-width ConvNet NTK (computed with
neural-tangents), which has no finite-width counterpart here. A task draws `models` networks of the run's model
(a small width, without normalisation in the presets) and uses their empirical NTK,
K(x, x') = (1 / k) sum_o <d f_o(x) / d theta, d f_o(x') / d theta>, traced over the network's outputs (or over k
random orthonormal output directions with `output_projections`: the same kernel up to a constant in expectation,
with Jacobians k / classes the size), averaged over the networks. Jacobians come from torch.func (vmap of jacrev over
the parameters); the synthetic images' Jacobians keep a graph, so the gradient flows through the kernel into them.

The loss: 0.5 x the mean squared error on centred one-hot targets, with learned labels as KIP's label-learning
variant when labels.learn is true.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from raydistill.config.errors import ConfigError
from raydistill.config.schema import DistillConfig
from raydistill.methods.krr.common import KrrContext, KrrMethod, solve_dtype
from raydistill.methods.krr.config import KipConfig, validate_kip
from raydistill.models.registry import network_from_seed
from raydistill.models.speed import set_cpu_kernels

JACOBIAN_CHUNK = 64  # target images per Jacobian pass (vmap's intermediates stay bounded)


def output_directions(num_outputs: int, k: int, rng: torch.Generator) -> Tensor | None:
    """k random orthonormal directions in output space (rows), or None for every output (k 0 or >= outputs)."""
    if k <= 0 or k >= num_outputs:
        return None
    q, _ = torch.linalg.qr(torch.randn(num_outputs, k, generator=rng, dtype=torch.float64))
    return q.T.contiguous()


def jacobians(model: nn.Module, params: dict[str, Tensor], x: Tensor, directions: Tensor | None) -> Tensor:
    """(n, outputs, P): the Jacobian of each image's outputs (projected on `directions`) by every parameter."""

    def outputs(p: dict[str, Tensor], one: Tensor) -> Tensor:
        out = functional_call(model, p, (one.unsqueeze(0),))[0]
        return out if directions is None else directions.to(out) @ out

    jac = vmap(jacrev(outputs), in_dims=(None, 0))(params, x)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)


class Kip(KrrMethod):
    """KIP with the empirical (finite-width) NTK."""

    name = "kip"
    config_cls = KipConfig

    def check(self, section: KipConfig, cfg: DistillConfig) -> None:
        validate_kip(section)
        if cfg.model.norm == "batch":
            raise ConfigError("model.norm: kip takes per-image Jacobians, which batch norm's batch statistics tie "
                              "together; set model.norm=none (KIP's ConvNet has no normalisation) or instance")

    def kernels(self, ctx: KrrContext, images: Tensor, labels: Tensor, real: Tensor, step: int,
                rng: torch.Generator) -> tuple[Tensor, Tensor, dict]:
        section: KipConfig = ctx.cfg.method_config
        dtype = solve_dtype(section, images)
        n_s, n_t = images.shape[0], real.shape[0]
        k_ss = images.new_zeros((n_s, n_s), dtype=dtype)
        k_ts = images.new_zeros((n_t, n_s), dtype=dtype)
        for _ in range(section.models):
            model = network_from_seed(ctx.model_factory, int(torch.randint(0, 2**62, (1,), generator=rng)))
            model = model.to(device=images.device, dtype=images.dtype).eval()
            set_cpu_kernels(model, "none")  # plain PyTorch ops: torch.func transforms them
            params = {k: v.detach() for k, v in model.named_parameters()}
            directions = output_directions(ctx.num_classes, section.output_projections, rng)
            j_s = jacobians(model, params, images, directions)  # the Jacobians stay in the run's dtype (their size)
            outputs = j_s.shape[1]
            k_ss = k_ss + torch.einsum("iop,jop->ij", j_s, j_s).to(dtype) / outputs
            with torch.no_grad():  # the target batch's Jacobians need no graph: the images are on the other side
                j_t = torch.cat([jacobians(model, params, real[i:i + JACOBIAN_CHUNK], directions)
                                 for i in range(0, n_t, JACOBIAN_CHUNK)])
            k_ts = k_ts + torch.einsum("iop,jop->ij", j_t, j_s).to(dtype) / outputs
        return k_ss / section.models, k_ts / section.models, {"parameters": int(j_s.shape[2])}

    def describe(self, s: KipConfig) -> str:
        return f"kip (empirical NTK) models={s.models} batch_real={s.batch_real} reg={s.reg:g}"
