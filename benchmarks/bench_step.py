"""Meta-step speed of raydistill's RaT-BPTT meta-gradient against the official `higher`-based algorithm.

    python benchmarks/bench_step.py --threads 1       # CPU, every config, writes benchmarks/results/step.json
    python benchmarks/bench_step.py --threads 1 --configs ipc1,ipc10 \\
        --variants reference,before,channels_last,fused_norm,raydistill \\
        --out benchmarks/results/step_levers.json     # one lever at a time
    python benchmarks/bench_step.py --device cuda --out benchmarks/results/step_gpu.json
    python benchmarks/bench_step.py --prefix-memory --configs quickstart,ipc1 --out benchmarks/results/step_memory.json
    python benchmarks/bench_step.py --threads 1 --variants raydistill,kernels_none \
        --out benchmarks/results/step_kernels.json   # the CPU speed layers (model.cpu_kernels) on and off

It needs `higher` (pip install -e '.[bench]'). With --strict the exit status is 1 when a target is missed (raydistill
not 1.5x faster than the reference on some config, or a prefix-memory ratio above 1.15); without it the targets are
only reported (`make bench` runs the other benchmarks after this one).

Variants, all computing the same meta-gradient of the same inputs (tests/unit/test_reference_gradient.py checks it),
except bf16:
- `reference`: tests/helpers/reference_higher.py, the official algorithm (torch.optim.Adam prefix that back-propagates
  into the synthetic images, higher.innerloop_ctx window), plain nn.GroupNorm, NCHW, glibc's default allocator: the
  official code as it runs;
- `reference+reuse`: the same in a process with raydistill's allocator setting (raydistill.runtime.MALLOC_TUNABLES,
  what `ray.reuse_memory` gives raydistill's workers): the reference with the process-level lever it could also use;
- `before`: raydistill with every speed lever off (plain nn.GroupNorm, nn.AvgPool2d and nn.Conv2d, NCHW, default
  allocator): the code this benchmark started from, except that every raydistill variant runs its inner optimizer
  on one flat parameter vector (that lever has no switch; bench_ab.py measures it across commits);
- `channels_last`, `fused_norm`, `fast_pool`: `before` plus that one lever (`ratbptt.channels_last`: ConvNormReLU
  convolutions in NHWC; `fused_norm`: raydistill's InstanceNorm with its analytic double backward; `fast_pool`:
  raydistill's AvgPool2x2), and channels_last with fused_norm together;
- `reuse`: `before` in a process with the allocator setting;
- `segments`: `fused_norm` with `ratbptt.window_segments` = round(sqrt(W)) (activation checkpointing of the window),
  so that its time and peak memory compare with `fused_norm`'s;
- `bf16`: raydistill with `ratbptt.precision: bf16` (not the same gradient: cosine > 0.99,
  tests/unit/test_window_options.py);
- `raydistill`: raydistill as its Ray workers run it by default: the CPU speed layers `model.cpu_kernels` (default
  auto, or --cpu-kernels) picks on this machine (on AVX2: Winograd and im2col convolutions, the fused norm, the fast
  pool), in a process with the allocator setting;
- `kernels_none`: `raydistill` with `model.cpu_kernels: none` (plain PyTorch convolutions, norm and pool; the same
  meta-gradient to float rounding): the switch's gain is `raydistill` against this;
- `samples2`, `samples4`: raydistill with `ratbptt.samples_per_task` 2 or 4 (that many samples batched through
  torch.func.vmap in one task; their mean is the mean of as many `raydistill` samples): the seconds reported are the
  task's divided by K (compare them with `raydistill`'s), the peak memory is the task's;
- `compile`: raydistill with `ratbptt.compile_prefix` (the prefix's steps through torch.compile; float32 rounding
  only): the warm-up step pays the compilation, and its peak memory includes the compiler's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference is a test helper
from helpers.reference_higher import official_network, reference_meta_gradient  # noqa: E402

from raydistill.config.schema import CPU_KERNELS  # noqa: E402
from raydistill.setup import load_config  # noqa: E402
from raydistill.evaluate.train import network_for  # noqa: E402
from raydistill.methods.base import task_seed  # noqa: E402
from raydistill.methods.ratbptt.batched import batched_meta_gradient  # noqa: E402
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient  # noqa: E402
from raydistill.models.speed import cpu_capability  # noqa: E402
from raydistill.runtime import MALLOC_TUNABLES  # noqa: E402

VARIANTS = ("reference", "reference+reuse", "before", "channels_last", "fused_norm", "channels_last+fused_norm",
            "fast_pool", "reuse", "bf16", "segments", "raydistill", "kernels_none", "samples2", "samples4", "compile")
# run in a process with raydistill's allocator setting
REUSE = ("reference+reuse", "reuse", "bf16", "raydistill", "kernels_none", "samples2", "samples4", "compile")
SAMPLES = {"samples2": 2, "samples4": 4}  # samples per task: times are reported per sample (task / K)


class Shape:
    """Just what network_for needs of a data set."""

    def __init__(self, channels: int, side: int, classes: int):
        self.image_shape, self.num_classes = (channels, side, side), classes


def configs(cpu_kernels: str = "auto") -> dict[str, tuple]:
    """key -> (description, config, data shape, real-set size), with `model.cpu_kernels` set to `cpu_kernels`."""
    fixed = ["ratbptt.window_mode=fixed", "ratbptt.real_batch=256", "ratbptt.inner_optimizer=adam", "data.zca=false",
             "augment.strategies=[]", f"model.cpu_kernels={cpu_kernels}"]

    def cifar(ipc: int, unroll: int, window: int) -> object:
        return load_config("cifar10-ipc10", [*fixed, f"ipc={ipc}", f"ratbptt.unroll={unroll}",
                                             f"ratbptt.window={window}", f"ratbptt.fixed_start={unroll - window}",
                                             "ratbptt.batch_per_class=null", "ratbptt.classes_per_step=null"],
                           check_paths=False)

    quick = load_config("quickstart", ["ratbptt.window_mode=fixed", "ratbptt.fixed_start=25",
                                       f"model.cpu_kernels={cpu_kernels}"], check_paths=False)
    c100 = load_config("cifar100-ipc10", [*fixed, "ratbptt.unroll=30", "ratbptt.window=10", "ratbptt.fixed_start=20"],
                       check_paths=False)
    return {
        "ipc1": ("CIFAR-10 shapes, IPC 1, T 40, W 15, start 25", cifar(1, 40, 15), Shape(3, 32, 10), 45000),
        "ipc10": ("CIFAR-10 shapes, IPC 10, T 30, W 10, start 20", cifar(10, 30, 10), Shape(3, 32, 10), 45000),
        "quickstart": ("quickstart: Fashion-MNIST IPC 1, width 32, T 40, W 15, start 25", quick, Shape(1, 28, 10),
                       55000),
        "cifar100": ("CIFAR-100 shapes, IPC 10, learned labels, T 30, W 10, start 20", c100, Shape(3, 32, 100),
                     45000),
        # long windows, for ratbptt.window_segments (not in the default list)
        "w60": ("CIFAR-10 shapes, IPC 1, T 70, W 60, start 10", cifar(1, 70, 60), Shape(3, 32, 10), 45000),
        "w120": ("CIFAR-10 shapes, IPC 1, T 130, W 120, start 10", cifar(1, 130, 120), Shape(3, 32, 10), 45000),
    }


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


class Problem:
    """One config's synthetic set, real data and network factory, and each variant's meta-step on them."""

    def __init__(self, cfg, shape: Shape, num_real: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        c, h, w = shape.image_shape
        n = cfg.ipc * shape.num_classes
        self.images = torch.randn(n, c, h, w, generator=g).to(device)
        self.hard = torch.arange(shape.num_classes).repeat_interleave(cfg.ipc).to(device)
        self.soft = F.one_hot(self.hard, shape.num_classes).float() if cfg.labels.learn else None
        self.real_x = torch.randn(num_real, c, h, w, generator=g).to(device)
        self.real_y = torch.randint(0, shape.num_classes, (num_real,), generator=g).to(device)
        self.cfg, self.shape, self.device = cfg, shape, device
        self.factory = lambda: network_for(cfg.model.name, cfg, shape)
        plain = replace(cfg, model=replace(cfg.model, cpu_kernels="none"))
        # raydistill's network with some of its layer levers swapped back to the plain torch layers
        self.levers = {"none": lambda: official_network(self.factory()),
                       "norm": lambda: official_network(self.factory(), norms=False),
                       "pool": lambda: official_network(self.factory(), pools=False), "all": self.factory,
                       "kernels_none": lambda: network_for(cfg.model.name, plain, shape)}

    def run(self, variant: str, seed: int) -> None:
        r, aug = self.cfg.method_config, self.cfg.augment
        args = (self.images, self.hard, self.soft, self.real_x, self.real_y)
        if variant.startswith("reference"):
            reference_meta_gradient(*args, self.factory, r, aug, seed)
            return
        if variant in SAMPLES:
            batched_meta_gradient(SynSet(*args[:3]), RealBatch(*args[3:]), self.factory,
                                  replace(r, samples_per_task=SAMPLES[variant]), aug, seed)
            return
        # raydistill's configured levers plus this one
        own = variant in ("bf16", "segments", "raydistill", "compile", "kernels_none")
        layers = "all" if variant in ("bf16", "raydistill", "compile") else {
            "fused_norm": "norm", "channels_last+fused_norm": "norm", "segments": "norm", "fast_pool": "pool",
            "kernels_none": "kernels_none"
        }.get(variant, "none")
        channels_last = r.channels_last if own else variant.startswith("channels_last")
        precision = "bf16" if variant == "bf16" else r.precision
        segments = round(r.window ** 0.5) if variant == "segments" else r.window_segments
        meta_gradient(SynSet(*args[:3]), RealBatch(*args[3:]), self.levers[layers],
                      replace(r, channels_last=channels_last, precision=precision, window_segments=segments,
                              compile_prefix=r.compile_prefix or variant == "compile"), aug, seed)

    def timed(self, variant: str, seed: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        self.run(variant, seed)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - began) / SAMPLES.get(variant, 1)


class Child:
    """A process that holds one config's Problem and runs one variant's meta-steps on request (`--serve`)."""

    def __init__(self, key: str, variant: str, device: torch.device, threads: int, cpu_kernels: str):
        self.variant = variant
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", key, "--device", str(device),
                                      "--threads", str(threads), "--cpu-kernels", cpu_kernels],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=self.environment(variant))

    @staticmethod
    def environment(variant: str) -> dict:
        """This process's environment with the variant's allocator setting (and no other GLIBC_TUNABLES)."""
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if variant in REUSE:
            env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
        return env

    def ask(self, what: str, seed: int) -> dict:
        self.proc.stdin.write(f"{what} {self.variant} {seed}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.variant} process exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> dict:
        """Ends the process; returns its peak resident size."""
        reply = self.ask("maxrss", 0)
        self.proc.stdin.close()
        self.proc.wait()
        return reply


def serve(key: str, device: torch.device, cpu_kernels: str) -> None:
    """The child's loop: one JSON line per request on the original stdout (everything else goes to stderr)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _, cfg, shape, num_real = configs(cpu_kernels)[key]
    problem = Problem(cfg, shape, num_real, device)
    for line in sys.stdin:
        what, variant, seed = line.split()
        if what == "maxrss":
            reply = {"max_rss_mib": round(_rss_kib("VmHWM") / 1024, 1) if device.type == "cpu" else None}
        elif what == "memory":
            with PeakMemory(device) as mem:
                seconds = problem.timed(variant, int(seed))
            reply = {"seconds": seconds, "peak_extra_mib": round(mem.peak / 2**20, 1)}
        else:
            reply = {"seconds": problem.timed(variant, int(seed))}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def bench(key: str, name: str, cfg, shape: Shape, num_real: int, device: torch.device, variants: list[str],
          repeats: int, threads: int) -> dict:
    r = cfg.method_config
    children = {v: Child(key, v, device, threads, cfg.model.cpu_kernels) for v in variants}
    try:
        memory = {v: children[v].ask("memory", task_seed(0, 1000, 0))["peak_extra_mib"] for v in variants}  # warm-up
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        for i in range(repeats):
            for v in variants:
                seconds[v].append(children[v].ask("run", task_seed(0, i, 0))["seconds"])
    finally:
        max_rss = {v: child.close()["max_rss_mib"] for v, child in children.items()}
    rows = {}
    for v in variants:
        median = statistics.median(seconds[v])
        rows[v] = {"seconds_per_meta_step": round(median, 4), "seconds_min": round(min(seconds[v]), 4),
                   "seconds_all": [round(x, 4) for x in seconds[v]],
                   "inner_steps_per_second": round(r.unroll / median, 2), "peak_extra_mib": memory[v],
                   "samples_per_task": SAMPLES.get(v, 1),
                   "process_max_rss_mib": max_rss[v], "allocator": "reuse" if v in REUSE else "default"}
        for base in ("reference", "reference+reuse"):
            if base in seconds:
                suffix = "" if base == "reference" else "_reuse"
                rows[v][f"speedup_vs_reference{suffix}"] = round(statistics.median(
                    [a / b for a, b in zip(seconds[base], seconds[v])]), 3)
                rows[v][f"speedup_of_min_times{suffix}"] = round(min(seconds[base]) / min(seconds[v]), 3)
    result = {"key": key, "config": name, "image_shape": list(shape.image_shape), "classes": shape.num_classes, "ipc": cfg.ipc,
              "width": cfg.model.width, "cpu_kernels": cfg.model.cpu_kernels, "unroll": r.unroll, "window": r.window, "start": r.fixed_start,
              "real_batch": r.real_batch, "learned_labels": cfg.labels.learn,
              "augment": list(cfg.augment.strategies), "variants": rows}
    if "reference" in rows and "raydistill" in rows:
        result["target_1.5x_met"] = rows["raydistill"]["speedup_vs_reference"] >= 1.5
    print(json.dumps(result), flush=True)
    return result


def prefix_memory(key: str, name: str, cfg, shape: Shape, num_real: int, device: torch.device) -> dict:
    """Peak extra memory of raydistill's meta-step with the window at the end of T = 2W and of T = 6W: the prefix
    keeps no graph, so the peak must not grow with T (target: ratio <= 1.15)."""
    problem = Problem(cfg, shape, num_real, device)
    r, W = cfg.method_config, cfg.method_config.window
    out = {}
    for label, unroll in (("T=2W", 2 * W), ("T=6W", 6 * W)):
        problem.cfg = replace(cfg, method_config=replace(r, unroll=unroll, window_mode="end"))
        problem.run("raydistill", task_seed(0, 1001, 0))  # warm the allocator at this shape first
        with PeakMemory(device) as mem:
            problem.run("raydistill", task_seed(0, 1002, 0))
        out[label] = {"unroll": unroll, "window": W, "peak_extra_mib": round(mem.peak / 2**20, 1)}
    ratio = out["T=6W"]["peak_extra_mib"] / max(out["T=2W"]["peak_extra_mib"], 1e-9)
    row = {"key": key, "config": name, "memory": out, "memory_ratio_6W_over_2W": round(ratio, 3),
           "memory_target_met": ratio <= 1.15}
    print(json.dumps(row), flush=True)
    return row


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def machine(device: torch.device) -> dict:
    info = {"glibc": platform.libc_ver()[1], "load_average_at_end": os.getloadavg(), "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": cpu_capability(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_result(result: dict, path: str) -> None:
    """`result` with the command line and the date, as JSON at `path`; an existing file's `history` list is kept."""
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              **result}
    out = Path(path)
    try:
        history = json.loads(out.read_text()).get("history")
    except (OSError, ValueError, AttributeError):
        history = None
    if isinstance(history, list):
        result["history"] = history
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--variants", default="reference,raydistill", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--configs", default="ipc1,ipc10,quickstart,cifar100", help="comma-separated config keys")
    ap.add_argument("--prefix-memory", action="store_true",
                    help="instead of timing: raydistill's peak memory at T = 2W and T = 6W (the prefix keeps no graph)")
    ap.add_argument("--cpu-kernels", choices=CPU_KERNELS, default="auto",
                    help="model.cpu_kernels of every raydistill variant (kernels_none always runs none)")
    ap.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)  # a child process (see Child)
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--out", default="benchmarks/results/step.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.serve:
        serve(args.serve, torch.device(args.device), args.cpu_kernels)
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    table = configs(args.cpu_kernels)
    keys = args.configs.split(",")
    if any(k not in table for k in keys):
        ap.error(f"unknown configs {[k for k in keys if k not in table]}; choose from {', '.join(table)}")
    if args.prefix_memory:
        rows = [prefix_memory(k, *table[k], device) for k in keys]
    else:
        rows = [bench(k, *table[k], device, variants, args.repeats, args.threads) for k in keys]
    write_result({"benchmark": "bench_step", "machine": machine(device), "results": rows}, args.out)
    met = all(r.get("target_1.5x_met", True) and r.get("memory_target_met", True) for r in rows)
    if not met:
        print("target missed: see target_1.5x_met / memory_target_met above")
    return 0 if met or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
