"""The kernel ridge regression closed form's cost as the synthetic (support) set grows.

    python benchmarks/bench_krr_solver.py            # support sets of 10, 100 and 500 images
    options: --sizes 10,100,500  --targets 1024  --features 2048  --repeats 7  --threads 2  --out FILE

One call = raydistill.methods.krr.solver.krr_predict on linear kernels of random features (support n x features with
a graph, targets x features without), the MSE loss on 10 classes, and its backward pass into the support features:
exactly what every FRePo, RFAD and KIP task adds on top of its network work. Times are medians of --repeats calls
after one warm-up call; memory is the peak of tensor bytes alive during one call (forward and backward), counted by
raydistill.memory.LiveBytes, float32 features and a float64 solve (the methods' default).

Writes benchmarks/results/krr_solver.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_tune import REPO, machine  # noqa: E402

from raydistill.memory import LiveBytes  # noqa: E402
from raydistill.methods.krr.solver import centred_targets, krr_predict, mse_loss  # noqa: E402

CLASSES = 10


def one_call(f_s: torch.Tensor, f_t: torch.Tensor, y_s: torch.Tensor, y_t: torch.Tensor) -> None:
    f_s = f_s.detach().requires_grad_(True)
    f64 = f_s.double()
    pred = krr_predict(f64 @ f64.T, f_t.double() @ f64.T, y_s, 1e-6, float64=True)
    torch.autograd.grad(mse_loss(pred, y_t), f_s)


def measure(n: int, targets: int, features: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(n)
    f_s, f_t = torch.randn(n, features, generator=g), torch.randn(targets, features, generator=g)
    labels = torch.arange(n) % CLASSES
    y_s = centred_targets(torch.nn.functional.one_hot(labels, CLASSES).double(), CLASSES)
    y_t = centred_targets(torch.nn.functional.one_hot(torch.arange(targets) % CLASSES, CLASSES).double(), CLASSES)
    one_call(f_s, f_t, y_s, y_t)  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        one_call(f_s, f_t, y_s, y_t)
        times.append(time.perf_counter() - began)
    with LiveBytes() as live:
        one_call(f_s, f_t, y_s, y_t)
    return {"support": n, "median_ms": round(1000 * statistics.median(times), 3),
            "min_ms": round(1000 * min(times), 3), "peak_mib": round(live.peak / 2**20, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,500")
    ap.add_argument("--targets", type=int, default=1024, help="target (real) images per call: FRePo's batch")
    ap.add_argument("--features", type=int, default=2048, help="feature dimension of the linear kernel")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "krr_solver.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(int(n), args.targets, args.features, args.repeats) for n in args.sizes.split(",")]
    for r in rows:
        print(f"support {r['support']:>4}: {r['median_ms']:.2f} ms, peak {r['peak_mib']:.1f} MiB", flush=True)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv),
              "targets": args.targets, "features": args.features, "threads": args.threads, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
