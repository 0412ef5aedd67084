"""Resident memory of gradient workers: what the real training images cost each worker process.

    python benchmarks/bench_memory.py                        # this checkout, writes benchmarks/results/memory.json
    git worktree add /tmp/rd-before <commit before the change>
    PYTHONPATH=/tmp/rd-before python benchmarks/bench_memory.py --label before --out /tmp/before.json

It starts a local Ray (127.0.0.1), starts K gradient workers of the installed raydistill (the real GradientWorker
class, as a run creates them) for each data set, waits until they are set up, and reads each worker's
/proc/PID/smaps_rollup:
- RSS: every page the process has resident, shared pages included (what `top` shows);
- PSS: shared pages divided among the processes that map them (object-store pages read by K workers count 1/K
  each): the worker's fair share of the node's memory;
- USS: pages only this process holds (Private_Clean + Private_Dirty): what the worker adds on its own.
The figures are the worker processes after set-up minus an idle Ray worker process (the interpreter, torch and Ray),
so they are what the data (and the method's set-up) costs. Before reading the figures, each worker reads every
training image it holds once (as its draws do over a run), so pages mapped but not yet read are not left out. The code "before" loaded the data set in every worker
and kept the training split as float32; "after" is this checkout (uint8 in the object store, read in place).

Data sets: the quickstart set (Fashion-MNIST, 55k training images of 1x28x28) and a stand-in of the issue's large
case, 60k random 3x128x128 images (55k training after the 5k validation split) registered in-process as
`bench-random-128` (random pixels: memory does not depend on their values).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import ray

DEFAULT_OUT = Path(__file__).parent / "results" / "memory.json"


def register_random_128() -> None:
    """A 60k-image 3x128x128 data set of random pixels (and 1k test images), under data.name bench-random-128."""
    import torch

    from raydistill.data.registry import DATASETS, RawData, register_dataset

    if "bench-random-128" in DATASETS:
        return

    @register_dataset("bench-random-128", default_root="/")
    def _random(root, cfg):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (61000, 3, 128, 128), generator=g, dtype=torch.uint8)
        y = torch.arange(61000) % 10
        return RawData(x[:60000], y[:60000], x[60000:], y[60000:], [str(c) for c in range(10)])


def smaps() -> dict:
    fields = {}
    for line in Path(f"/proc/{os.getpid()}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name.strip()] = int(value.split()[0]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


class Probe:
    """An idle worker process with the same imports: the baseline a worker's figures are taken above."""

    def __init__(self):
        import torch  # noqa: F401

        import raydistill.engine.worker  # noqa: F401

    def memory(self) -> dict:
        return smaps()


def measure(cfg_overrides: list[str], workers: int) -> dict:

    from raydistill.setup import load_config
    from raydistill.engine.worker import GradientWorker

    class MeasuredWorker(GradientWorker):
        def __init__(self, *args):
            register_random_128()
            super().__init__(*args)

        def memory(self) -> dict:
            held = getattr(getattr(self, "data", None), "held", None)
            if held is not None:  # read every held image once, as draws do over a run: its pages become resident
                for chunk in held.images.chunks:
                    for block in chunk.split(1024):  # (a sum with dtype=int64 would make an int64 copy first)
                        int(block.max())
            return smaps()

    register_random_128()
    cfg = load_config("quickstart", cfg_overrides + ["eval.every=0"], check_paths=False)
    args: tuple = (cfg, "ray")
    shared = None
    in_constructor = "shared" in inspect.signature(GradientWorker.__init__).parameters  # older checkouts
    if in_constructor or hasattr(GradientWorker, "attach"):  # the driver shares the data
        from raydistill.data.registry import load_dataset
        from raydistill.engine.backend import BACKENDS
        from raydistill.engine.shared_data import share

        shared = share(load_dataset(cfg.data), cfg, BACKENDS["ray"])
        if in_constructor:
            args = (*args, shared)
    store_bytes = 0 if shared is None else sum(ray.get(r)["pixels"].nbytes for r in shared.train)
    probe = ray.remote(num_cpus=0)(Probe).remote()
    idle = ray.get(probe.memory.remote())
    began = time.perf_counter()
    actors = [ray.remote(num_cpus=0)(MeasuredWorker).remote(*args) for _ in range(workers)]
    if shared is not None and not in_constructor:  # today's workers map the data at their first task
        ray.get([a.attach.remote(shared) for a in actors])
    per_worker = ray.get([a.memory.remote() for a in actors])
    seconds = time.perf_counter() - began
    for a in actors + [probe]:
        ray.kill(a)
    del shared
    mean = {k: sum(w[k] for w in per_worker) / workers - idle[k] for k in ("rss", "pss", "uss")}
    return {"workers": workers, "idle_worker": idle, "per_worker_raw": per_worker,
            "per_worker_above_idle_mib": {k: round(v / 2**20, 1) for k, v in mean.items()},
            "setup_seconds": round(seconds, 1), "object_store_train_mib": round(store_bytes / 2**20, 1)}


def step_seconds(repeats: int) -> dict:
    """Seconds per quickstart meta-step in this process (the real data as a worker holds it), median of `repeats`
    after one warm-up step: what drawing real batches from uint8 instead of float32 costs per step."""
    import statistics

    import torch

    from raydistill.setup import load_config
    from raydistill.data.registry import load_dataset
    from raydistill.engine.worker import method_resources
    from raydistill.methods.registry import get_method
    from raydistill.synset.synthetic import init_synthetic

    torch.set_num_threads(1)
    cfg = load_config("quickstart", check_paths=False)
    dataset = load_dataset(cfg.data)
    method = get_method(cfg.method)
    ctx = method.setup(cfg, method_resources(cfg, dataset, method.needs, torch.device("cpu")))
    syn = init_synthetic(cfg, dataset, method)
    times = []
    for step in range(repeats + 1):
        began = time.perf_counter()
        method.gradient(ctx, syn.learnables, syn.hard_labels, step, 0, None)
        times.append(time.perf_counter() - began)
    return {"median_s": round(statistics.median(times[1:]), 4), "all_s": [round(t, 4) for t in times[1:]],
            "threads": 1}


SETS = {
    "quickstart (fashion-mnist 55k x 1x28x28)": [],
    "60k x 3x128x128 (random stand-in)": ["data.name=bench-random-128", "model.depth=5"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="after")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sets", nargs="*", default=list(SETS), help="which data sets (default: both)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--step-repeats", type=int, default=0, help="also time quickstart meta-steps in-process")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from raydistill.compat import loopback_init_kwargs

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=5 * 2**30, logging_level="WARNING",
             **loopback_init_kwargs())
    try:
        results = {}
        for name in args.sets:
            results[name] = measure(SETS[name], args.workers)
            print(f"{args.label} | {name} | per worker above idle (MiB): {results[name]['per_worker_above_idle_mib']}",
                  flush=True)
    finally:
        ray.shutdown()
    import raydistill

    if args.step_repeats:
        results["quickstart meta-step (in-process, 1 thread)"] = step_seconds(args.step_repeats)
        print(f"{args.label} | meta-step: {results['quickstart meta-step (in-process, 1 thread)']}", flush=True)
    record = {"label": args.label, "raydistill": str(Path(raydistill.__file__).parent), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": sys.version.split()[0], "ray": ray.__version__, "command": " ".join(sys.argv),
              "results": results}
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    earlier = existing.get(args.label, {}).get("results", {})  # a label measured in several runs keeps them all
    record["results"] = {**earlier, **results}
    existing[args.label] = record
    args.out.write_text(json.dumps(existing, indent=2) + "\n")


if __name__ == "__main__":
    main()
