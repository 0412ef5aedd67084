"""The 3x3 convolution at the inner loop's shapes: oneDNN's direct kernel against Winograd F(2x2, 3x3).

    python benchmarks/bench_conv.py --threads 1 --out benchmarks/results/conv.json

For each shape (N x C x H x H, C -> C channels) and each path, the median time of
- `forward`: the convolution alone;
- `first`: forward and the gradient with respect to input and weight (a prefix step's pattern);
- `unrolled`: a create-graph gradient of the weight, then the gradient of a function of it with respect to input
  and weight (a window step's pattern: the convolution differentiated twice);
and the float32 result's largest error against float64, relative to the output's largest value. `applies` says
whether raydistill's Conv2d takes the Winograd path at that shape (raydistill.models.winograd.winograd_applies);
the other rows show why the limits are where they are. Timings in one process, paths interleaved per round, run
with raydistill's allocator setting (raydistill.runtime.MALLOC_TUNABLES, what `ray.reuse_memory` gives the workers:
the script re-executes itself with it); `--default-allocator` keeps glibc's default, under which the Winograd path's
larger temporaries are page-faulted in afresh and the convolution alone gains nothing (the whole meta-step still
did: benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import machine, write_result  # noqa: E402

from raydistill.models.layers import Conv2d  # noqa: E402
from raydistill.runtime import MALLOC_TUNABLES  # noqa: E402
from raydistill.models.winograd import winograd_applies, winograd_conv3x3  # noqa: E402

SHAPES = [  # (N, C, H): where they occur
    (10, 128, 16), (10, 128, 8),  # CIFAR-10 IPC 1 window and prefix: layers 2 and 3
    (100, 128, 8), (100, 128, 16),  # IPC 10, layers 3 and 2: above the size limit
    (256, 128, 8),  # the real batch of 256, layer 3: above the size limit
    (10, 32, 14),  # the quickstart's width 32: below the channel limit
]
PATHS = {"direct": lambda x, w: F.conv2d(x, w, padding=1), "winograd": winograd_conv3x3}


def patterns(conv, x: torch.Tensor, w: torch.Tensor) -> dict:
    def forward():
        with torch.no_grad():
            conv(x, w)

    def first():
        torch.autograd.grad(torch.tanh(conv(x, w)).pow(2).sum(), (x, w))

    def unrolled():
        gw = torch.autograd.grad(torch.tanh(conv(x, w)).pow(2).sum(), w, create_graph=True)[0]
        torch.autograd.grad(gw.pow(2).sum(), (x, w))

    return {"forward": forward, "first": first, "unrolled": unrolled}


def error(conv, x: torch.Tensor, w: torch.Tensor) -> float:
    truth = F.conv2d(x.double(), w.double(), padding=1)
    with torch.no_grad():
        return ((conv(x, w).double() - truth).abs().max() / truth.abs().max()).item()


def bench_shape(n: int, c: int, h: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=g).relu().requires_grad_()  # post-ReLU, as the net feeds it
    w = (torch.randn(c, c, 3, 3, generator=g) * (2 / (9 * c)) ** 0.5).requires_grad_()
    runs = {name: patterns(conv, x, w) for name, conv in PATHS.items()}
    times: dict = {name: {p: [] for p in runs[name]} for name in runs}
    for name in runs:  # warm-up
        for fn in runs[name].values():
            fn()
    for _ in range(repeats):
        for name in runs:
            for p, fn in runs[name].items():
                began = time.perf_counter()
                fn()
                times[name][p].append(time.perf_counter() - began)
    row = {"shape": [n, c, h, h], "applies": winograd_applies(x, Conv2d(c, c, 3, padding=1))}
    for name, conv in PATHS.items():
        row[name] = {p: round(statistics.median(t) * 1e3, 3) for p, t in times[name].items()}
        row[name]["float32_error"] = float(f"{error(conv, x.detach(), w.detach()):.3g}")
    row["speedup"] = {p: round(row["direct"][p] / row["winograd"][p], 3) for p in runs["direct"]}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/conv.json")
    ap.add_argument("--default-allocator", action="store_true", help="glibc's default allocator, not the workers'")
    args = ap.parse_args()
    tunables = "" if args.default_allocator else MALLOC_TUNABLES
    if os.environ.get("GLIBC_TUNABLES", "") != tunables:  # glibc reads it at process start
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": tunables})
    torch.set_num_threads(args.threads)
    rows = [bench_shape(n, c, h, max(3, args.repeats * 10 // max(10, n))) for n, c, h in SHAPES]
    allocator = "default" if args.default_allocator else "reuse"
    write_result({"machine": machine(torch.device("cpu")), "allocator": allocator, "unit": "ms (median)", "rows": rows},
                 args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
