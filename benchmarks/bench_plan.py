"""The memory planner against measurement: predicted and measured peak of one RaT-BPTT task, config by config.

    python benchmarks/bench_plan.py            # measure every config, write benchmarks/results/plan.json
    python benchmarks/bench_plan.py --replan   # re-predict from the measurements already in plan.json (no runs)
    python benchmarks/bench_plan.py --fit      # also print the CPU calibration (the scale) these configs give

Each config runs one `meta_gradient` call (the gradient task's computation) in a fresh process with the workers'
allocator setting (GLIBC_TUNABLES, raydistill.runtime.MALLOC_TUNABLES) and one torch thread, as a worker runs it.
After a warm-up call on the smallest images the network takes, the process resets its peak RSS (/proc/self/clear_refs) and the figure is VmHWM after
the call minus VmRSS before it: the peak resident memory the call added. The planner's figure for the same config is
`raydistill.plan.plan(...)`'s task peak on the CPU: the rehearsal's bytes through the CPU calibration
(raydistill.plan.devices). The configs span image sizes 28 to 128, widths 16 to 128, depths 3 to 5, IPC 1 to 10,
windows 2 to 30, with and without window segments and real-batch chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "plan.json"
TOLERANCE = 0.20  # the planner's target: within +-20 % of the measured peak

# name: (image size, width, depth, ipc, window, segments, real batch, real-batch chunks)
CONFIGS = {
    "fmnist-w32-ipc1-W10": (28, 32, 3, 1, 10, 1, 256, 1),
    "fmnist-w128-ipc10-W10": (28, 128, 3, 10, 10, 1, 256, 1),
    "fmnist-w64-ipc10-W30": (28, 64, 3, 10, 30, 1, 128, 1),
    "fmnist-w128-ipc10-W30-seg5": (28, 128, 3, 10, 30, 5, 256, 1),
    "cifar-w128-ipc1-W20": (32, 128, 3, 1, 20, 1, 256, 1),
    "cifar-w64-ipc10-W10": (32, 64, 3, 10, 10, 1, 256, 1),
    "cifar-w128-ipc10-W15-seg3": (32, 128, 3, 10, 15, 3, 512, 1),
    "cifar-w128-ipc1-W8-real2048-chunks8": (32, 128, 3, 1, 8, 1, 2048, 8),
    "64px-w64-d4-ipc2-W8": (64, 64, 4, 2, 8, 1, 128, 1),
    "64px-w128-d4-ipc1-W10-seg2": (64, 128, 4, 1, 10, 2, 256, 1),
    "64px-w16-d4-ipc10-W20": (64, 16, 4, 10, 20, 1, 256, 1),
    "128px-w32-d5-ipc1-W4": (128, 32, 5, 1, 4, 1, 64, 1),
    "128px-w128-d5-ipc1-W2": (128, 128, 5, 1, 2, 1, 64, 1),
    "128px-w64-d5-ipc2-W6-seg3": (128, 64, 5, 2, 6, 3, 128, 1),
    "128px-w16-d5-ipc10-W4-chunks4": (128, 16, 5, 10, 4, 1, 256, 4),
}
# Held out: measured after the CPU calibration was fitted on CONFIGS, to see how it carries over (extra settings
# in the ninth entry).
HELD_OUT = {
    "held-32px-w96-ipc5-W12-learned-labels": (32, 96, 3, 5, 12, 1, 256, 1, {"labels": {"learn": True}}),
    "held-48px-w32-ipc3-W10-seg2": (48, 32, 3, 3, 10, 2, 256, 1, {}),
    "held-96px-w48-d4-ipc1-W6-chunks2": (96, 48, 4, 1, 6, 1, 256, 2, {}),
    "held-28px-w128-ipc10-W20-bpc2": (28, 128, 3, 10, 20, 1, 256, 1, {"ratbptt": {"batch_per_class": 2}}),
    "held-64px-w64-d4-ipc5-W4": (64, 64, 4, 5, 4, 1, 128, 1, {}),
}
ALL = {**CONFIGS, **HELD_OUT}


def config_dict(spec: tuple) -> dict:
    size, width, depth, ipc, window, segments, real, chunks = spec[:8]
    extra = spec[8] if len(spec) > 8 else {}
    return {
        "ipc": ipc, "data": {"name": "bench-plan", "image_size": size},
        "model": {"width": width, "depth": depth}, "labels": extra.get("labels", {}),
        "ratbptt": {"unroll": window, "window": window, "window_mode": "end", "real_batch": real,
                    "window_segments": segments, "real_batch_chunks": chunks, **extra.get("ratbptt", {})},
    }


def shape_of(spec: tuple):
    from raydistill.plan import DataShape

    return DataShape((3, spec[0], spec[0]), 10)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(name: str) -> None:
    """Run one config's task in this process and print {"measured": bytes, "seconds": s}."""
    import torch

    from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient
    from raydistill.models.registry import build_network
    from raydistill.setup import config_from_dict

    torch.set_num_threads(1)
    spec = ALL[name]
    cfg = config_from_dict(config_dict(spec))
    shape, nc = (3, spec[0], spec[0]), 10
    g = torch.Generator().manual_seed(0)
    hard = torch.arange(nc).repeat_interleave(cfg.ipc)
    images = torch.randn(len(hard), *shape, generator=g)
    soft = torch.rand(len(hard), nc, generator=g) if cfg.labels.learn else None
    real = RealBatch(torch.randn(cfg.method_config.real_batch, *shape, generator=g),
                     torch.randint(0, nc, (cfg.method_config.real_batch,), generator=g))

    def factory():
        return build_network(cfg.model.name, cfg.model, shape, nc)

    from dataclasses import replace

    # Warm-up: the same layers on the smallest images the network takes (libraries loaded, kernels chosen), so the
    # heap it leaves behind (the workers' allocator keeps freed memory) is too small to hide the measured call's
    tiny = 2 ** cfg.model.depth
    small = replace(cfg.method_config, unroll=1, window=1, window_segments=1, real_batch=2, real_batch_chunks=1)
    meta_gradient(SynSet(torch.randn(nc, 3, tiny, tiny), hard[:nc]), RealBatch(torch.randn(2, 3, tiny, tiny),
                  real.y[:2]), lambda: build_network(cfg.model.name, cfg.model, (3, tiny, tiny), nc), small,
                  cfg.augment, 0)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status("VmRSS")
    began = time.perf_counter()
    meta_gradient(SynSet(images, hard, soft), real, factory, cfg.method_config, cfg.augment, 1)
    seconds = time.perf_counter() - began
    print(json.dumps({"measured": _status("VmHWM") - before, "seconds": seconds}))


def measure(name: str) -> dict:
    from raydistill.runtime import MALLOC_TUNABLES

    env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", name], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict(name: str) -> dict:
    """The planner's CPU figure for a config, the rehearsal's bytes under it, and the task's counted operations."""
    from raydistill.methods.ratbptt.rehearse import step_flops
    from raydistill.models.speed import rehearsing_the_cpu
    from raydistill.plan import CPU, task_estimate
    from raydistill.setup import config_from_dict

    spec = ALL[name]
    cfg = config_from_dict(config_dict(spec))
    est = task_estimate(cfg, shape_of(spec), CPU)
    with rehearsing_the_cpu():
        flops = step_flops(cfg, shape_of(spec))
    return {"rehearsed": est.rehearsed, "predicted": est.peak, "flops": flops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--replan", action="store_true", help="re-predict from the measurements in --out, run nothing")
    ap.add_argument("--fit", action="store_true", help="print the CPU calibration that fits the calibration configs")
    ap.add_argument("--only", nargs="*", help="measure only these configs")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    if args.child:
        register_bench_data()
        child(args.child)
        return
    register_bench_data()
    old = json.loads(args.out.read_text())["configs"] if args.out.exists() else {}
    rows = {}
    for name in (args.only or ALL):
        row = dict(old.get(name, {})) if args.replan else measure(name)
        row.update(predict(name))
        row["error"] = row["predicted"] / row["measured"] - 1
        if "seconds" in row:
            row["gflops_per_s"] = row["flops"] / 1e9 / row["seconds"]
        rows[name] = row
        print(f"{name:40s} measured {row['measured'] / 2**30:6.2f} GiB  predicted {row['predicted'] / 2**30:6.2f} "
              f"GiB  error {row['error']:+.1%}  ({row.get('seconds', 0):.1f} s)", flush=True)
    if args.only:
        rows = {**old, **rows}
    errors = [abs(r["error"]) for r in rows.values()]
    held = [abs(r["error"]) for n, r in rows.items() if n in HELD_OUT]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": __import__("torch").__version__,
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count()},
        "command": "python benchmarks/bench_plan.py",
        "what": "peak RSS added by one meta_gradient call (1 torch thread, the workers' allocator setting) "
                "against the planner's CPU prediction",
        "tolerance": TOLERANCE,
        "max_abs_error": max(errors),
        "max_abs_error_held_out": max(held) if held else None,
        "within_tolerance": sum(e <= TOLERANCE for e in errors),
        "configs": {n: {**rows[n], "held_out": n in HELD_OUT,
                        "spec": dict(zip(("image_size", "width", "depth", "ipc", "window", "segments", "real_batch",
                                          "real_batch_chunks", "extra"), ALL[n]))}
                    for n in rows},
    }
    if args.fit:  # the scale whose largest relative error over the calibration configs is smallest
        ratios = [r["measured"] / r["rehearsed"] for n, r in rows.items() if n in CONFIGS]
        lo, hi = min(ratios), max(ratios)
        scale = 2 / (1 / lo + 1 / hi)
        print(f"CPU calibration (minimax over {len(ratios)} configs): scale {scale:.3f}, largest error "
              f"{scale / lo - 1:+.1%} / {scale / hi - 1:+.1%}")
        rates = sorted(r["gflops_per_s"] for r in rows.values() if "gflops_per_s" in r)
        if rates:
            print(f"CPU speed: {rates[0]:.1f} to {rates[-1]:.1f} GFLOP/s, median {rates[len(rates) // 2]:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"max |error| {max(errors):.1%}; {result['within_tolerance']} of {len(errors)} within +-{TOLERANCE:.0%}; "
          f"wrote {args.out}")


def register_bench_data() -> None:
    """`data.name: bench-plan`: a data set name for the configs (never loaded: the bench builds its own tensors)."""
    from raydistill.data.registry import DATASETS, register_dataset

    if "bench-plan" not in DATASETS:
        register_dataset("bench-plan", default_root="/")(lambda root, cfg: None)


if __name__ == "__main__":
    main()
