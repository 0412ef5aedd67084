"""Wall time and outcome of the shipped Fashion-MNIST window x unroll sweep (target: under ~20 minutes on 2 cores).

    python benchmarks/bench_tune.py                       # runs `raydistill tune` on a fresh storage folder
    python benchmarks/bench_tune.py --existing DIR --wall-s S   # records a sweep already run with the same command

Writes benchmarks/results/tune_fmnist.json: the command, the machine, the wall time (Ray start, the checks before starting, every
trial and the outputs), and each sample's row of results.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "tune_configs" / "fmnist-window-unroll.yaml"


def machine() -> dict:
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version()}


def rows(folder: Path) -> list[dict]:
    with open(folder / "results.csv") as fh:
        return [{k: v for k, v in row.items() if k != "checkpoint"} for row in csv.DictReader(fh)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--existing", type=Path, help="the output folder of a sweep already run with the same command")
    ap.add_argument("--wall-s", type=float, help="its measured wall time (with --existing)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tune_fmnist.json")
    args = ap.parse_args()
    if args.existing is not None:
        folder, wall = args.existing, args.wall_s
    else:
        storage = Path(tempfile.mkdtemp(prefix="bench-tune-"))
        sweep = storage / SWEEP.name
        sweep.write_text(SWEEP.read_text().replace("storage: runs/tune", f"storage: {storage}"))
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "raydistill.cli", "tune", str(sweep)], check=True)
        wall = time.perf_counter() - began
        folder = storage / "fmnist-window-unroll"
    body = {"command": f"raydistill tune {SWEEP.relative_to(REPO)}", "machine": machine(),
            "date": time.strftime("%Y-%m-%d"), "wall_s": round(wall, 1), "rows": rows(folder)}
    args.out.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps({k: body[k] for k in ("command", "wall_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
