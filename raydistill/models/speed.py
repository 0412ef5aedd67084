"""The one switch for raydistill's CPU speed layers: `model.cpu_kernels` (auto | all | none).

The layers (raydistill.models.layers) that replace a PyTorch kernel by a faster path for the inner loop's shapes:

- `winograd`: 3x3 convolutions with 64+ channels on small inputs by Winograd's F(2x2, 3x3)
  (raydistill.models.winograd), against oneDNN's convolution;
- `im2col`: single-input-channel convolutions (a first layer on grey images) on ATen's im2col kernel, against
  oneDNN's;
- `instance_norm`: instance norm whose double backward is analytic (a few fused elementwise passes), against
  autograd's composite double backward of group norm;
- `avg_pool`: 2x2 average pooling by adding contiguous halves, against the CPU avg_pool2d kernel.

Each computes the same function as the op it replaces (up to the order of float additions); `all` and `none` give
meta-gradients equal to float rounding (tests/unit/test_models.py). The setting belongs to a network: every speed layer
is a `SpeedLayer`, which asks `kernel_enabled(self, name)` on each call, and `set_cpu_kernels(network, mode)` sets
them all (`ConvNormReLU.conv_channels_last` works the same way). `raydistill.models.registry.build_network`, which
builds every network that computes from a config (the inner loop's in the gradient workers, the validator's, the
evaluation's, in Ray tasks or in process), applies `model.cpu_kernels` to it; a network built otherwise (tests,
benchmarks) gets `auto` until told. (The values are not on / off: YAML, and so a `model.cpu_kernels=off` override,
reads those as booleans.)

- `none`: none of them: nn.Conv2d's, F.avg_pool2d's and F.group_norm's own kernels everywhere (for comparisons, and
  a fallback should a layer misbehave on some machine);
- `all`: all of them, wherever their shape conditions hold (e.g. `winograd_applies`);
- `auto` (the default): decided once per process from the CPU's vector ISA, as ATen's dispatch sees it
  (`torch.backends.cpu.get_cpu_capability()`, which also honours ATEN_CPU_CAPABILITY):
    * AVX2: all four, as measured on the 2-core AVX2 VM (benchmarks/README.md): bit for bit what `all` gives;
    * anything else (AVX512, the ARM and POWER capabilities, DEFAULT): only `instance_norm` and `avg_pool`. Their
      gain is algorithmic (fewer passes over memory than the code they replace, whatever the vector width), while
      `winograd` and `im2col` race oneDNN's convolution kernels, whose speed depends on the ISA, and their limits
      (MIN_CHANNELS, MAX_INPUT_ELEMENTS, the one-channel rule) were tuned on AVX2 alone; oneDNN runs other kernels
      on AVX-512. Measure there (benchmarks/bench_step.py with its `none` variants, bench_conv.py) before widening
      the rule.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from raydistill.config.schema import CPU_KERNELS

KERNELS = ("winograd", "im2col", "instance_norm", "avg_pool")
ISA_INDEPENDENT = frozenset({"instance_norm", "avg_pool"})  # their gain does not depend on the vector ISA
TUNED_ON = "AVX2"  # the capability every kernel's limits were measured on

_auto: frozenset[str] | None = None  # what `auto` means in this process, decided on first use


def cpu_capability() -> str:
    """The CPU vector ISA ATen dispatches to: "AVX2", "AVX512", "DEFAULT", "SVE256", "VSX", ..."""
    return torch.backends.cpu.get_cpu_capability()


def auto_kernels(capability: str) -> frozenset[str]:
    """What `auto` enables on a CPU of this capability (module docstring)."""
    return frozenset(KERNELS) if capability == TUNED_ON else ISA_INDEPENDENT


def resolve(mode: str) -> frozenset[str]:
    """The speed layers a `model.cpu_kernels` value runs on this machine."""
    if mode not in CPU_KERNELS:
        raise ValueError(f"model.cpu_kernels: unknown value {mode!r}; choose one of {', '.join(CPU_KERNELS)}")
    if mode == "all":
        return frozenset(KERNELS)
    if mode == "none":
        return frozenset()
    return auto_kernels(cpu_capability())


_CPU_DEVICES = frozenset({"cpu"})


def on_cpu(x: torch.Tensor) -> bool:
    """Whether `x` is where Winograd's CPU-only path runs: the CPU, and the meta device while a memory rehearsal
    plans for the CPU (`rehearsing_the_cpu`). The im2col path has no meta kernel: a rehearsal runs the native
    convolution there (a single-channel first layer: its im2col buffer is small)."""
    return x.device.type in _CPU_DEVICES


@contextlib.contextmanager
def rehearsing_the_cpu():
    """Inside, Winograd's CPU-only path takes meta tensors as the CPU's, so a rehearsal on the meta device
    (raydistill.methods.rehearsal) runs the path a CPU worker runs and counts what it holds."""
    global _CPU_DEVICES
    before = _CPU_DEVICES
    _CPU_DEVICES = frozenset({"cpu", "meta"})
    try:
        yield
    finally:
        _CPU_DEVICES = before


class SpeedLayer:
    """Mixin of the layers with a speed path: which speed layers this module may run (None: `auto`)."""

    cpu_kernels: frozenset[str] | None = None


def kernel_enabled(layer: SpeedLayer, name: str) -> bool:
    """Whether `layer` runs the speed layer `name` (one of KERNELS): what the layers ask on each call."""
    global _auto
    kernels = layer.cpu_kernels
    if kernels is None:
        if _auto is None:
            _auto = resolve("auto")
        kernels = _auto
    return name in kernels


def set_cpu_kernels(network: nn.Module, mode: str) -> int:
    """Run `network`'s speed layers as `mode` (auto, all or none) says; returns how many layers it set."""
    kernels = resolve(mode)
    layers = [m for m in network.modules() if isinstance(m, SpeedLayer)]
    for layer in layers:
        layer.cpu_kernels = kernels
    return len(layers)
