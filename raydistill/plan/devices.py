"""The devices a plan is made for: named GPUs, a memory size, or the CPU; and how a rehearsal's bytes become a
device's peak.

A rehearsal counts the bytes the task's tensors hold (raydistill.methods.rehearsal). What a device shows on top:
- a GPU: the CUDA context and library handles outside PyTorch's allocator, and the caching allocator's rounding and
  fragmentation (GPU_CONTEXT and GPU_SLACK, conservative figures: not yet calibrated on a GPU);
- the CPU: glibc's heap under the workers' allocator setting (freed blocks stay in the heap for reuse, and the
  holes between them count in the peak RSS) and oneDNN's scratch buffers. Measured peak RSS over rehearsed bytes
  ranged from 1.07 to 1.47 over the calibration configs of benchmarks/bench_plan.py (higher where a window is
  recomputed in segments or a real batch runs in chunks at large images); CPU_SCALE is the scale whose largest
  relative error over them is smallest (benchmarks/results/plan.json).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from raydistill.config.errors import ConfigError

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
GB = 10**9

# Total memory as nvidia-smi reports it, per GPU model (what `--gpu NAME` plans for).
GPUS = {
    "t4": 15360 * MIB,  # gcp-gpu.yaml's worker GPU
    "a10g": 23028 * MIB,  # aws-gpu.yaml's worker GPU (g5 instances)
    "l4": 23034 * MIB,
    "a100-40": 40960 * MIB,
    "a100-80": 81920 * MIB,
    "h100": 81559 * MIB,
}
GPU_CONTEXT = 512 * MIB  # CUDA context, cuDNN and cuBLAS handles and workspaces: outside the tensors
GPU_SLACK = 1.10  # the caching allocator's rounding and fragmentation over the bytes the tensors hold
CPU_SCALE = 1.24  # peak RSS = CPU_SCALE x rehearsed bytes (benchmarks/bench_plan.py --fit)
# One torch thread of the calibration CPU ran the calibration configs' tasks at 4 to 35 GFLOP/s (narrow networks
# lowest, width 128 highest); the median turns a task's counted operations into a rough step time.
CPU_GFLOPS = 15.0
HEADROOM = 0.10  # a plan fits when its peak leaves this share of the device's memory free

_UNITS = {"": 1, "b": 1, "k": KIB, "kb": 1000, "kib": KIB, "m": MIB, "mb": 10**6, "mib": MIB, "g": GIB, "gb": GB,
          "gib": GIB, "t": TIB, "tb": 10**12, "tib": TIB}


@dataclass(frozen=True)
class Device:
    """Where a task runs: `kind` "gpu" or "cpu"; `memory` the bytes it may use (None: not known)."""

    name: str
    kind: str
    memory: int | None = None

    def peak(self, rehearsed: int) -> int:
        """A task's peak on this device, from the bytes its rehearsal counted."""
        if self.kind == "gpu":
            return int(rehearsed * GPU_SLACK) + GPU_CONTEXT
        return int(rehearsed * CPU_SCALE)

    def shared(self, share: float) -> Device:
        """This GPU as a worker with `share` of it sees it (ray.gpus_per_worker below 1); whole otherwise."""
        if self.kind != "gpu" or share >= 1 or self.memory is None:
            return self
        return Device(f"{self.name} (share {share:g})", "gpu", int(self.memory * share))

    def describe(self) -> str:
        size = f", {format_bytes(self.memory)}" if self.memory else ""
        return f"{self.name}{size}"


CPU = Device("cpu", "cpu")


def parse_memory(text: str | int | float, what: str = "--gpu-memory") -> int:
    """Bytes from "24GiB", "16 GB", "8000MiB", "1.5TiB" or a number of bytes; one-line ConfigError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"{what}: {text!r} is not a memory size; write it as 24GiB, 16GB or 8000MiB")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0 or value != value or value == float("inf"):
        raise ConfigError(f"{what}: {text!r} must be a positive size, e.g. 24GiB")
    return int(value)


def gpu(name: str) -> Device:
    """The named GPU (`--gpu a10g`)."""
    key = name.strip().lower()
    if key not in GPUS:
        raise ConfigError(f"--gpu: unknown GPU {name!r}; choose one of {', '.join(GPUS)}, or give --gpu-memory SIZE")
    return Device(key, "gpu", GPUS[key])


def gpu_of_size(memory: int) -> Device:
    return Device("a GPU", "gpu", memory)


def format_bytes(n: int | float) -> str:
    n = float(n)
    for unit, size in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}" if abs(n) / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"
