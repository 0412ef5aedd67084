"""Prepared data on the ImageNet stand-in: `raydistill prepare` throughput, then distill, boost and tune on it, and
the meta-step time on the prepared Parquet set against the same images read in memory (`data.name: imagefolder`).

    python benchmarks/bench_prepare.py                    # builds the stand-ins under /tmp/raydistill-bench if missing
    python benchmarks/bench_prepare.py --skip prepare runs       # only the meta-step comparison

The stand-in is Fashion-MNIST as a JPEG folder at 128 px RGB (scripts/make_fmnist_folder.py): 60k training and
10k val images in 10 classes, ImageNette's class count and resolution at six times its size.

1. prepare: `raydistill prepare ROOT --out DEST --image-size 128` on the full stand-in, `--repeats` times into fresh
   folders; images/s = (train + test images) / the command's wall time (Ray's start included; a local Ray on this
   machine's cores).
2. The runs (distill, boost, tune, meta-step) use a smaller stand-in of `--per-class` training images a class (and a
   sixth as many val images), built and prepared the same way: at 128 px every process that loads the data holds it
   as float32 (60k images are 11.8 GB per copy, and the driver and each worker hold one), more than this machine can
   spare at commit 734d52a; the uint8 data path (a829a66) lifts that: `--per-class 0` runs them on the full set.
   - distill / boost / tune: a tiny config (ConvNet-5 of width 8, as the imagenette presets but narrow; T 4, W 2,
     4 meta-steps) through `raydistill distill`, `raydistill boost` (2 blocks of 2 steps) and `raydistill tune` (2
     samples), wall time of each command.
   - meta-step: the same config (ConvNet-5 w32, T 10, W 5, real batch 128, `--steps` meta-steps, one worker with
     2 threads, no evaluation) with `data.name: parquet` on the prepared set and `data.name: imagefolder` on the
     JPEG folder, `--step-repeats` runs of each, alternating; per run the median of the per-step `seconds` in
     metrics.jsonl (the first step left out), then the median over runs.

Writes benchmarks/results/prepare.json (figures, commands, the machine and its load average around each phase).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAKE_FOLDER = REPO / "scripts" / "make_fmnist_folder.py"
RAYDISTILL = [sys.executable, "-m", "raydistill.cli"]

TINY = """ipc: 1
steps: 4
seed: 0
data: {{name: parquet, root: {root}, image_size: 128, val_size: 100}}
model: {{name: convnet, width: 8, depth: 5, norm: instance}}
ratbptt: {{unroll: 4, window: 2, real_batch: 64}}
eval: {{num_models: 1, steps: 10, every: 2, val_models: 1, val_steps: 10}}
ray: {{workers: 1, cpus_per_worker: 1, worker_threads: 1, checkpoint_every: 2}}
"""

STEP = """ipc: 1
steps: {steps}
seed: 0
data: {{name: {name}, root: {root}, image_size: 128, val_size: {val}}}
model: {{name: convnet, width: 32, depth: 5, norm: instance}}
ratbptt: {{unroll: 10, window: 5, window_mode: end, real_batch: 128}}
eval: {{every: 0}}
ray: {{workers: 1, cpus_per_worker: 1, worker_threads: 2, checkpoint_every: 1000}}
"""

SWEEP = """name: stand-in-sweep
base: {base}
set: {{steps: 4}}
search:
  ratbptt.window: {{grid: [1, 2]}}
metric: val_acc
scheduler: {{name: fifo}}
max_concurrent_trials: 1
head_cpus: 0
max_failures: 0
storage: {storage}
"""


def machine() -> dict:
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                      * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def code_version() -> dict:
    import raydistill

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "raydistill")
    return {"commit": git("rev-parse", "HEAD"), "raydistill_from": str(Path(raydistill.__file__).parent),
            "checkout_raydistill_dirty": bool(dirty)}


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(cmd: list[str], log: Path, cwd: Path | None = None) -> dict:
    """Run a command to completion; its wall time and the 1-minute load average before and after."""
    before, began = load(), time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"bench_prepare: {' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return {"wall_s": round(wall, 2), "load_before": before, "load_after": load()}


def ensure_stand_in(root: Path, per_class: int | None, work: Path) -> dict:
    """The stand-in at `root` (built when missing); what its stand-in.json records."""
    marker = root / "stand-in.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("size") != 128 or record.get("per_class") != per_class:
            raise SystemExit(f"bench_prepare: {root} holds another stand-in ({marker}); choose another --root")
        return {**record, "built_now": False}
    run([sys.executable, str(MAKE_FOLDER), "--out", str(root), "--size", "128",
         *(["--per-class", str(per_class)] if per_class else [])], work / f"make-{root.name}.log")
    return {**json.loads(marker.read_text()), "built_now": True}


def prepare(root: Path, dest: Path, log: Path) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [*RAYDISTILL, "prepare", str(root), "--out", str(dest), "--image-size", "128", "--quiet"]
    timing = run(cmd, log)
    manifest = json.loads((dest / "manifest.json").read_text())
    images = sum(manifest["splits"][s]["count"] for s in ("train", "test"))
    shards = sum(len(manifest["splits"][s]["shards"]) for s in ("train", "test"))
    size = sum(f.stat().st_size for f in dest.rglob("*.parquet"))
    return {**timing, "images": images, "images_per_s": round(images / timing["wall_s"], 1), "shards": shards,
            "parquet_mib": round(size / 2**20, 1)}


def step_seconds(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["seconds"] for r in rows if "seconds" in r and "step" in r][1:]  # the first step warms up
    return {"median_step_s": round(statistics.median(steps), 3), "steps_timed": len(steps),
            "min_step_s": round(min(steps), 3), "max_step_s": round(max(steps), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/raydistill-bench/fmnist128"),
                    help="the full stand-in (built here when missing)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/raydistill-bench/work"),
                    help="prepared sets, runs and logs (emptied first)")
    ap.add_argument("--repeats", type=int, default=2, help="timed prepare runs on the full stand-in (median)")
    ap.add_argument("--per-class", type=int, default=600,
                    help="training images a class for the runs (0: the full stand-in)")
    ap.add_argument("--steps", type=int, default=8, help="meta-steps of each meta-step run")
    ap.add_argument("--step-repeats", type=int, default=2, help="meta-step runs of each source, alternating")
    ap.add_argument("--skip", nargs="*", default=[], choices=["prepare", "runs", "step"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prepare.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Every command starts a Ray of its own. A private Ray temp dir keeps ray.init (given no address) from joining
    # whatever cluster /tmp/ray/ray_current_cluster names (another user's, or a dead one it would wait on forever).
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rdjb", dir="/tmp")
    os.environ.pop("RAY_ADDRESS", None)
    try:
        code = measure(args)
    except BaseException:
        print(f"bench_prepare: Ray's logs are kept in {os.environ['RAY_TMPDIR']}", file=sys.stderr)
        raise
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    return code


def save(path: Path, body: dict) -> None:
    """Write the figures so far; sections this run does not measure (--skip) keep their earlier values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **body}, indent=2) + "\n")


def measure(args: argparse.Namespace) -> int:
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    work = args.work
    body: dict = {"machine": machine(), "code": code_version(), "date": time.strftime("%Y-%m-%d %H:%M")}

    if "prepare" not in args.skip:
        full = ensure_stand_in(args.root, None, work)
        body["stand_in"] = {k: full[k] for k in ("size", "counts", "tint", "quality", "build_s", "built_now")}
        runs = [prepare(args.root, work / f"prepared-full-{i}", work / f"prepare-full-{i}.log")
                for i in range(args.repeats)]
        for i in range(args.repeats):
            shutil.rmtree(work / f"prepared-full-{i}", ignore_errors=True)  # 3.4 GB of pixels each
        body["prepare"] = {
            "command": f"raydistill prepare {args.root} --out DEST --image-size 128 --quiet",
            "runs": runs,
            "median_wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
            "median_images_per_s": round(statistics.median(r["images_per_s"] for r in runs), 1)}
        print(json.dumps(body["prepare"]), flush=True)
        save(args.out, body)

    if args.per_class:
        small_root = args.root.with_name(f"{args.root.name}-{args.per_class}")
        small = ensure_stand_in(small_root, args.per_class, work)
    else:  # the runs on the full stand-in
        small_root, small = args.root, ensure_stand_in(args.root, None, work)
    prepared = work / "prepared-small"
    small_prepare = prepare(small_root, prepared, work / "prepare-small.log")
    body["runs_stand_in"] = {"root": str(small_root), "counts": small["counts"], "prepare": small_prepare}
    save(args.out, body)

    if "runs" not in args.skip:
        tiny = work / "tiny.yaml"
        tiny.write_text(TINY.format(root=prepared))
        sweep = work / "sweep.yaml"
        sweep.write_text(SWEEP.format(base=tiny, storage=work / "tune"))
        commands = {
            "distill": [*RAYDISTILL, "distill", "--preset", str(tiny), "--out", str(work / "distill"), "--quiet"],
            "boost": [*RAYDISTILL, "boost", "--preset", str(tiny), "--block", "1", "--blocks", "2",
                      "--steps-per-block", "2", "--out", str(work / "boost"), "--quiet"],
            "tune": [*RAYDISTILL, "tune", str(sweep), "--quiet"]}
        body["runs"] = {}
        for name, cmd in commands.items():
            body["runs"][name] = {"command": " ".join(["raydistill", *cmd[3:]]).replace(str(work), "WORK"),
                                  **run(cmd, work / f"{name}.log")}
            print(name, json.dumps(body["runs"][name]), flush=True)
            save(args.out, body)
        body["runs"]["config"] = TINY.format(root="PREPARED")

    if "step" not in args.skip:
        val = min(500, small["counts"]["train"] // 10)
        config = STEP.format(steps=args.steps, name="parquet|imagefolder", root="ROOT", val=val)
        body["meta_step"] = {"config": config, "passes": []}
        for rep in range(args.step_repeats):  # the two sources alternate, so a change in load hits both
            for name, root in (("parquet", prepared), ("imagefolder", small_root)):
                cfg = work / f"step-{name}.yaml"
                cfg.write_text(STEP.format(steps=args.steps, name=name, root=root, val=val))
                out = work / f"step-{name}-{rep}"
                cmd = [*RAYDISTILL, "distill", "--preset", str(cfg), "--out", str(out), "--no-eval", "--quiet"]
                timing = {"source": name, "pass": rep, **run(cmd, work / f"step-{name}-{rep}.log"),
                          **step_seconds(out)}
                body["meta_step"]["passes"].append(timing)
                print(json.dumps(timing), flush=True)
                save(args.out, body)
        for name in ("parquet", "imagefolder"):
            mine = [p for p in body["meta_step"]["passes"] if p["source"] == name]
            body["meta_step"][name] = {"median_step_s": round(statistics.median(p["median_step_s"] for p in mine), 3),
                                       "min_step_s": min(p["min_step_s"] for p in mine),
                                       "median_wall_s": round(statistics.median(p["wall_s"] for p in mine), 2)}

    save(args.out, body)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
