"""The README's quickstart table: `raydistill distill --preset quickstart`, on Ray and in one process.

    python benchmarks/bench_quickstart.py            # runs both commands into fresh folders (about 5 minutes on 2 cores)
    python benchmarks/bench_quickstart.py --existing RAY_RUN IN_PROCESS_RUN --wall-s S1 S2   # records runs made
                                                     # with the same commands and timed by the caller

Writes benchmarks/results/quickstart.json: the commands, the machine, each run's wall time, distillation time,
selected step and validation accuracy, and its eval.json (the distilled set and every baseline, with and without
augmentation, per network).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_tune import REPO, machine  # noqa: E402

from raydistill.storage.artifact import read_distilled  # noqa: E402

COMMANDS = {"ray": ["distill", "--preset", "quickstart"], "in_process": ["distill", "--preset", "quickstart", "--in-process"]}


def record(run: Path, wall: float, command: list[str]) -> dict:
    meta = read_distilled(run / "distilled.parquet").metadata
    return {"command": "raydistill " + " ".join(command), "wall_s": round(wall, 1),
            "distill_seconds": meta["distill_seconds"], "selected_step": meta["selected_step"],
            "val_acc": meta["val_acc"], "eval": json.loads((run / "eval.json").read_text())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--existing", type=Path, nargs=2, metavar=("RAY_RUN", "IN_PROCESS_RUN"))
    ap.add_argument("--wall-s", type=float, nargs=2, metavar=("S1", "S2"), help="their measured wall times")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quickstart.json")
    args = ap.parse_args()
    runs = {}
    if args.existing is not None:
        if args.wall_s is None:
            ap.error("--existing needs --wall-s")
        for (name, command), run, wall in zip(COMMANDS.items(), args.existing, args.wall_s):
            runs[name] = record(run, wall, command)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="bench-quickstart-"))
        for name, command in COMMANDS.items():
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "raydistill.cli", *command, "--quiet", "--out", str(scratch / name)],
                           check=True)
            runs[name] = record(scratch / name, time.perf_counter() - began, command)
    body = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "runs": runs}
    args.out.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps({name: {k: r[k] for k in ("wall_s", "distill_seconds", "val_acc")} for name, r in runs.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
