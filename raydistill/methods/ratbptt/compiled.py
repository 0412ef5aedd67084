"""`ratbptt.compile_prefix`: the prefix's inner loss (forward and first-order backward) through torch.compile.

Only the prefix can be compiled: the window needs the gradient of a gradient, and torch.compile's autograd (AOTAutograd,
torch 2.14) refuses double backward ("torch.compile with aot_autograd does not currently support double backward").
The prefix is ordinary training, so its compiled steps change nothing but float32 rounding.

Every sample builds a fresh network, and torch.compile guards on the module it traced, so compiling each sample's own
network would recompile every sample (and fall back to eager after torch's recompile limit). One compiled loss per
network structure, device and dtype is kept for the life of the process instead, calling a private copy of the
first such network with each sample's parameters (`functional_call`), so every later sample reuses the compiled code.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from raydistill.models.losses import soft_cross_entropy


class CompiledLoss:
    """soft_cross_entropy(network(x) at the flat parameter vector, targets), compiled once; counts its calls."""

    def __init__(self, model: nn.Module, names: list[str], shapes: list[torch.Size], sizes: list[int]):
        template = copy.deepcopy(model)  # the one module the compiled code is specialised to

        def loss(flat: Tensor, x: Tensor, targets: Tensor) -> Tensor:
            params = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
            return soft_cross_entropy(functional_call(template, params, (x,)), targets)

        self.fn = torch.compile(loss, dynamic=False)
        self.calls = 0

    def __call__(self, flat: Tensor, x: Tensor, targets: Tensor) -> Tensor:
        self.calls += 1
        if self.calls > 1:
            return self.fn(flat, x, targets)
        try:  # the first call compiles: a machine without inductor's compiler fails here
            return self.fn(flat, x, targets)
        except Exception as exc:
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            raise RuntimeError(f"ratbptt.compile_prefix: torch.compile failed ({type(exc).__name__}: {first}); "
                               "install a C++ compiler (CPU) or Triton (GPU), or set ratbptt.compile_prefix: false"
                               ) from exc


_COMPILED: dict[tuple, CompiledLoss] = {}


def compiled_loss(model: nn.Module, names: list[str], shapes: list[torch.Size], sizes: list[int],
                  channels_last: bool) -> CompiledLoss:
    """This process's compiled inner loss for networks built like `model` (same layers, shapes, device, dtype and
    convolution layout, which the module's repr does not show)."""
    first = next(model.parameters())
    key = (repr(model), tuple(names), tuple(tuple(s) for s in shapes), str(first.device), first.dtype, channels_last)
    if key not in _COMPILED:
        _COMPILED[key] = CompiledLoss(model, names, shapes, sizes)
    return _COMPILED[key]
