"""Meta-step speed and window memory of the single-machine RaT-BPTT step.

    python benchmarks/bench_step.py                   # CPU, writes benchmarks/results/step.json
    python benchmarks/bench_step.py --device cuda --out benchmarks/results/step_gpu.json

Speed: seconds per meta-step (median over --repeats after one warm-up step) and inner steps per second, for the
quickstart config and a CIFAR-shaped config (3x32x32, ConvNet-3 width 128, IPC 10, T and W scaled down to fit a
CPU). Every timed step uses window_mode=end, so each one runs exactly T inner steps of which W are differentiable.

Memory: the peak extra memory of one meta-step at T = 2W and T = 6W with the same W. The prefix keeps no graph, so
the peak must not grow with T (target: ratio <= 1.15). On CPU it is the rise of the peak resident set size above
the resident size before the step (the peak is reset through /proc/self/clear_refs); on CUDA it is
torch.cuda.max_memory_allocated above the allocation before the step.

The real data are random tensors of the data set's shape and size: the cost of a step does not depend on pixel
values, and the benchmark then runs anywhere without data files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from raydistill.config.loading import load_config
from raydistill.eval.train import network_for
from raydistill.methods.base import task_seed
from raydistill.methods.ratbptt.meta_gradient import meta_gradient


class Shape:
    """Just what network_for needs of a data set."""

    def __init__(self, channels: int, side: int, classes: int):
        self.image_shape, self.num_classes = (channels, side, side), classes


def configs() -> dict[str, tuple]:
    quick = load_config("quickstart", check_paths=False)
    cifar = load_config(
        "cifar10-ipc10",
        ["ratbptt.unroll=20", "ratbptt.window=10", "ratbptt.real_batch=256", "data.zca=false"],
        check_paths=False,
    )
    # (config, data shape, real-set size)
    return {"quickstart (fmnist ipc1 w32)": (quick, Shape(1, 28, 10), 55000),
            "cifar-shaped (ipc10 w128)": (cifar, Shape(3, 32, 10), 45000)}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak extra bytes used inside a `with` block (CUDA allocator, or process RSS on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss_kib("VmHWM") * 1024 - self.base


class Step:
    def __init__(self, cfg, shape: Shape, num_real: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        c, h, w = shape.image_shape
        n = cfg.ipc * shape.num_classes
        self.images = torch.randn(n, c, h, w, generator=g).to(device)
        self.hard = torch.arange(shape.num_classes).repeat_interleave(cfg.ipc).to(device)
        self.real_x = torch.randn(num_real, c, h, w, generator=g).to(device)
        self.real_y = torch.randint(0, shape.num_classes, (num_real,), generator=g).to(device)
        self.cfg, self.shape, self.device = cfg, shape, device
        self.factory = lambda: network_for(cfg.model.name, cfg, shape)

    def run(self, unroll: int, window: int, step: int) -> None:
        r = replace(self.cfg.method_config, unroll=unroll, window=window, window_mode="end")
        meta_gradient(self.images, self.hard, None, self.real_x, self.real_y, self.factory, r,
                      self.cfg.augment, task_seed(0, step, 0))

    def timed(self, unroll: int, window: int, step: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.run(unroll, window, step)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        began = time.perf_counter()
        self.run(unroll, window, step)
        return time.perf_counter() - began


def bench(name: str, cfg, shape: Shape, num_real: int, device: torch.device, repeats: int) -> dict:
    step = Step(cfg, shape, num_real, device)
    T, W = cfg.method_config.unroll, cfg.method_config.window
    step.run(T, W, step=1000)  # warm-up: allocator, kernels, caches
    seconds = [step.timed(T, W, i) for i in range(repeats)]
    median = statistics.median(seconds)
    memory = {}
    for label, unroll in (("T=2W", 2 * W), ("T=6W", 6 * W)):
        step.run(unroll, W, step=1001)  # warm the allocator at this shape first
        with PeakMemory(device) as mem:
            step.run(unroll, W, step=1002)
        memory[label] = {"unroll": unroll, "window": W, "peak_extra_mib": round(mem.peak / 2**20, 1)}
    ratio = memory["T=6W"]["peak_extra_mib"] / max(memory["T=2W"]["peak_extra_mib"], 1e-9)
    row = {
        "config": name,
        "image_shape": list(shape.image_shape),
        "ipc": cfg.ipc,
        "width": cfg.model.width,
        "unroll": T,
        "window": W,
        "real_batch": cfg.method_config.real_batch,
        "seconds_per_meta_step": round(median, 4),
        "seconds_all": [round(s, 4) for s in seconds],
        "inner_steps_per_second": round(T / median, 2),
        "memory": memory,
        "memory_ratio_6W_over_2W": round(ratio, 3),
        "memory_target_met": ratio <= 1.15,
    }
    print(json.dumps(row), flush=True)
    return row


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results/step.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [bench(name, *spec, device, args.repeats) for name, spec in configs().items()]
    result = {"benchmark": "bench_step", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": time.strftime("%Y-%m-%d"), "machine": machine(device), "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["memory_target_met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
