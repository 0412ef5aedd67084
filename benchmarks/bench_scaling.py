"""Scaling of the distributed engine: meta-gradients per second with K workers, and the parameter server's overhead.

    python benchmarks/bench_scaling.py          # writes benchmarks/results/scaling.json
    python benchmarks/bench_scaling.py --gpu-share --out benchmarks/results/scaling_gpu_share.json

With --gpu-share: sync efficiency of 4 workers sharing one GPU (ray.gpus_per_worker 0.25, one CPU and one torch
thread each) against 1 worker on it, the quickstart with window_mode=end, and nothing else. It needs a GPU for a
real figure. With `--num-gpus 1 --num-cpus 4` on a machine without one, Ray places the workers on a logical GPU and
they compute on the CPU: a dry run of the wiring (the result says dry_run), not a figure. --data-root points the
quickstart's Fashion-MNIST elsewhere (on a GPU machine without the Debian package).

Throughput: the quickstart config (Fashion-MNIST IPC 1, ConvNet-3 w32, T = 40, W = 15) run by the real engine in
sync mode with K = 1 and K = 2 workers of 1 torch thread each; meta-gradients per second = K / the median wall time
of a meta-step (after warm-up steps). Efficiency = throughput(K) / (K x throughput(1)). Measured with
window_mode=end (every sample costs the same, so this is the system's scaling) and window_mode=random (RaT-BPTT
itself: a sync step waits for the longer of the K windows, so it scales less).

Server overhead: a synthetic set the size of CIFAR-100 IPC 50 (5000 x 3 x 32 x 32 float32, 61 MB) goes through the
same loop as a sync step (snapshot, workers read it from the object store and return a gradient of its size, the
server averages and applies Adam, publishes the next snapshot) with workers that do no maths. The wall time of such a
step is the overhead any real step pays on top of the workers' compute; its share is reported against the measured
CPU meta-step of benchmarks/results/step.json's CIFAR-shaped config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from raydistill.compat import loopback_init_kwargs
from raydistill.setup import load_config
from raydistill.engine.driver import distill
from raydistill.engine.server import ParameterServer

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import machine  # noqa: E402


def throughput(workers: int, window_mode: str, steps: int, warmup: int, more: tuple[str, ...] = ()) -> dict:
    cfg = load_config("quickstart", [f"steps={steps}", "eval.every=0", f"ray.workers={workers}",
                                     "ray.worker_threads=1", "threads=1", f"ratbptt.window_mode={window_mode}",
                                     "ray.checkpoint_every=1000", *more])
    with tempfile.TemporaryDirectory() as tmp:
        summary = distill(cfg, Path(tmp) / "run", progress=False, evaluate=False)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    devices = sorted({str(p.get("device")) for p in summary["status"].get("placement", [])})
    step_seconds = [r["seconds"] for r in records if "seconds" in r][warmup:]
    compute = [max(r_s for r_s in r["worker_seconds"]) for r in records if "worker_seconds" in r][warmup:]
    median = statistics.median(step_seconds)
    return {"workers": workers, "window_mode": window_mode, "steps_timed": len(step_seconds),
            "median_step_seconds": round(median, 4), "median_worker_compute_seconds": round(statistics.median(compute), 4),
            "meta_gradients_per_second": round(workers / median, 3), "overrides": list(more),
            "worker_devices": devices}


def gpu_share(steps: int, warmup: int, data_root: str | None) -> dict:
    """4 workers at 0.25 GPU each against 1 worker, the quickstart in sync mode with equal-cost windows."""
    more = ["ray.gpus_per_worker=0.25", "ray.worker_threads=1", "device=auto"]
    if data_root:
        more.append(f"data.root={data_root}")
    runs = [throughput(k, "end", steps, warmup, tuple(more)) for k in (1, 4)]
    for run in runs:
        print(json.dumps(run), flush=True)
    efficiency = runs[1]["meta_gradients_per_second"] / (4 * runs[0]["meta_gradients_per_second"])
    return {"throughput": runs, "sync_efficiency_4_workers_on_one_gpu": round(efficiency, 3)}


class NullWorker:
    """Reads the snapshot like a real worker and returns a gradient of its size, computing nothing."""

    def compute(self, data, snapshot: list, step: int, slot: int) -> dict:
        began = time.perf_counter()
        snap = ray.get(snapshot[0])
        grad = np.full_like(snap["learnables"]["images"], 1e-3 * (slot + 1))
        return {"grads": {"images": grad}, "loss": 0.0, "stats": {}, "slot": slot, "slot_state": None,
                "version": snap["version"], "seconds": time.perf_counter() - began}


def server_overhead(n: int, shape: tuple, workers: int, steps: int, warmup: int) -> dict:
    cfg = load_config("quickstart", [f"steps={steps + warmup}", "ray.checkpoint_every=100000"], check_paths=False)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, *shape), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ps = ray.remote(ParameterServer).options(num_cpus=0).remote(cfg, tmp)
        ray.get(ps.start.remote({"images": images}, np.arange(n) % 100))
        pool = [ray.remote(NullWorker).options(num_cpus=0).remote() for _ in range(workers)]
        times = []
        for step in range(steps + warmup):
            began = time.perf_counter()
            snap = ray.get(ps.snapshot.remote())  # the engine's sync step, call for call
            grads = [w.compute.remote(None, snap["ref"], step, slot) for slot, w in enumerate(pool)]
            report = ray.get(ps.apply_sync.remote(step, *grads))
            assert report["accepted"] and report["applied"]
            times.append(time.perf_counter() - began)
        for actor in [ps, *pool]:
            ray.kill(actor)
    times = times[warmup:]
    return {"images": n, "image_shape": list(shape), "megabytes": round(images.nbytes / 2**20, 1), "workers": workers,
            "median_step_overhead_seconds": round(statistics.median(times), 4),
            "all_seconds": [round(t, 4) for t in times]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    ap.add_argument("--gpu-share", action="store_true", help="only: 4 workers at 0.25 GPU each against 1 worker")
    ap.add_argument("--num-gpus", type=float, default=None, help="GPUs Ray may use (default: the ones it detects)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: os.cpu_count())")
    ap.add_argument("--data-root", default=None, help="the quickstart's Fashion-MNIST folder (default: its usual one)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.num_cpus or os.cpu_count(), num_gpus=args.num_gpus, include_dashboard=False,
             logging_level=logging.WARNING, **loopback_init_kwargs())
    if args.gpu_share:
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            shared = gpu_share(args.steps, args.warmup, args.data_root)
        finally:
            ray.shutdown()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        result = {"benchmark": "bench_scaling --gpu-share", "command": " ".join(["python", *sys.argv]),
                  "date": time.strftime("%Y-%m-%d"), "machine": machine(device), "ray_gpus": gpus,
                  "dry_run": device.type != "cuda", **shared}
        return write(result, args.out)
    try:
        runs = []
        for mode in ("end", "random"):
            for k in (1, 2):
                runs.append(throughput(k, mode, args.steps, args.warmup))
                print(json.dumps(runs[-1]), flush=True)
        overhead = server_overhead(5000, (3, 32, 32), workers=2, steps=20, warmup=3)
        print(json.dumps({k: v for k, v in overhead.items() if k != "all_seconds"}), flush=True)
    finally:
        ray.shutdown()

    efficiency = {}
    for mode in ("end", "random"):
        one, two = (next(r for r in runs if r["workers"] == k and r["window_mode"] == mode) for k in (1, 2))
        efficiency[mode] = round(two["meta_gradients_per_second"] / (2 * one["meta_gradients_per_second"]), 3)
    step_file = Path(__file__).parent / "results" / "step.json"
    cifar_step = next((r["variants"]["raydistill"]["seconds_per_meta_step"]
                       for r in json.loads(step_file.read_text())["results"]
                       if r["config"].lower().startswith("cifar") and "raydistill" in r.get("variants", {})),
                      None) if step_file.exists() else None
    share = None if cifar_step is None else round(
        overhead["median_step_overhead_seconds"] / (cifar_step + overhead["median_step_overhead_seconds"]), 4)
    result = {"benchmark": "bench_scaling", "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              "machine": {**machine(torch.device("cpu")), "torch_threads_per_worker": 1},
              "throughput": runs, "efficiency_k2": efficiency, "efficiency_target": 0.85,
              "server_overhead": overhead, "reference_step_seconds": cifar_step,
              "overhead_share_of_reference_step": share, "overhead_share_target": 0.05}
    print(json.dumps({"efficiency_k2": efficiency, "overhead_share": share}))
    return write(result, args.out)


def write(result: dict, path: str) -> int:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
