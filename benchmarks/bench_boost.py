"""Boost-DD versus direct distillation across budgets, on Fashion-MNIST at CPU scale.

    python benchmarks/bench_boost.py        # writes benchmarks/results/boost.json and boost.png

(a) boosted: blocks of 1 image per class, distilled stage by stage up to IPC K (beta for earlier blocks);
(b) distilled directly at IPC K, then cut to its first k images per class;
(c) distilled directly at each k.
All use the quickstart recipe (ConvNet-3 w32, T = 40, W = 15, meta lr 1e-2) with N meta-steps per image per class:
(a) N per stage, (b) K x N, (c) k x N, so every set at budget k has had the same number of steps per image. Each
set is scored by --models fresh ConvNets on the test split (mean +- std), beside a random real subset of the
same size. No validation-based selection: every set is its last step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from raydistill.compat import loopback_init_kwargs
from raydistill.storage.artifact import read_distilled
from raydistill.engine.boost import boost
from raydistill.synset.blocks import schedule
from raydistill.setup import load_config
from raydistill.setup import load_checked
from raydistill.engine.driver import distill
from raydistill.data.selection import random_real_subset
from raydistill.evaluate.train import Accuracy, Networks, evaluate_set
from raydistill.storage.run_dir import targets_of

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import machine  # noqa: E402


def score(x, targets, dataset, cfg, models: int) -> dict:
    networks = Networks("convnet", models, cfg.eval.steps, "test", seed=cfg.seed + 20_000)
    acc = evaluate_set(x, targets, dataset, cfg, networks, device=torch.device("cpu"))
    return {"mean": round(acc.mean, 2), "std": round(acc.std, 2), "accs": acc.accs}


def score_random(dataset, cfg, ipc: int, models: int) -> dict:
    """Network i trains on its own random subset (seed + 10_000 + i), as the final report's baseline does."""
    accs = []
    for i in range(models):
        x, y = random_real_subset(dataset, ipc, seed=cfg.seed + 10_000 + i)
        networks = Networks("convnet", 1, cfg.eval.steps, "test", seed=cfg.seed + 20_000 + i)
        accs += evaluate_set(x, y, dataset, cfg, networks, device=torch.device("cpu")).accs
    acc = Accuracy.of(accs)
    return {"mean": round(acc.mean, 2), "std": round(acc.std, 2), "accs": acc.accs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-ipc", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100, help="meta-steps per image per class (N)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/boost.json")
    args = ap.parse_args()
    K, N = args.max_ipc, args.steps
    base = load_config("quickstart", ["eval.every=0", "eval.steps=300"])
    dataset = load_checked(base)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             **loopback_init_kwargs())
    began = time.time()
    sets: dict[str, dict[int, tuple]] = {"boosted": {}, "direct_cut": {}, "direct": {}, "random_real": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = dataclasses.replace(base, boost=dataclasses.replace(base.boost, stages=schedule(1, K, args.beta, N)))
            boost(cfg, Path(tmp) / "boost", progress=False, evaluate=False)
            boosted = read_distilled(Path(tmp) / "boost" / "distilled.parquet")
            distill(dataclasses.replace(base, ipc=K, steps=K * N), Path(tmp) / f"direct{K}", progress=False,
                           evaluate=False)
            direct_k = read_distilled(Path(tmp) / f"direct{K}" / "distilled.parquet")
            for k in range(1, K + 1):
                sets["boosted"][k] = boosted.prefix(k)
                sets["direct_cut"][k] = direct_k.prefix(k)
                if k == K:
                    sets["direct"][k] = direct_k
                else:
                    distill(dataclasses.replace(base, ipc=k, steps=k * N), Path(tmp) / f"direct{k}",
                                   progress=False, evaluate=False)
                    sets["direct"][k] = read_distilled(Path(tmp) / f"direct{k}" / "distilled.parquet")
                print(f"distilled budget {k} ({time.time() - began:.0f} s)", flush=True)
    finally:
        ray.shutdown()

    results: dict[str, dict[str, dict]] = {name: {} for name in sets}
    for k in range(1, K + 1):
        cfg_k = dataclasses.replace(base, ipc=k)
        for name in ("boosted", "direct_cut", "direct"):
            dset = sets[name][k]
            results[name][str(k)] = score(dset.images, targets_of(dset), dataset, cfg_k, args.models)
        results["random_real"][str(k)] = score_random(dataset, cfg_k, k, args.models)
        print(json.dumps({"ipc": k, **{n: results[n][str(k)]["mean"] for n in results}}), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "bench_boost", "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              "machine": machine(torch.device("cpu")), "max_ipc": K, "steps_per_image_per_class": N,
              "beta": args.beta, "models_per_set": args.models, "eval_steps": base.eval.steps,
              "seconds": round(time.time() - began, 1), "test_accuracy": results}
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(results, K, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(results: dict, max_ipc: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"boosted": "(a) Boost-DD prefix", "direct_cut": f"(b) direct IPC {max_ipc}, first k",
              "direct": "(c) direct at k", "random_real": "random real subset"}
    ks = list(range(1, max_ipc + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in labels.items():
        means = [results[name][str(k)]["mean"] for k in ks]
        stds = [results[name][str(k)]["std"] for k in ks]
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xlabel("budget: images per class (k)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(ks)
    ax.set_title("Fashion-MNIST, ConvNet-3 w32 (CPU scale)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
