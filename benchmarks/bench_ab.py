"""A/B of one bench_step config across commits: what a change did to the meta-step, in interleaved rounds.

    python benchmarks/bench_ab.py --config quickstart --repeats 11 \\
        reference@HEAD~2 raydistill@HEAD~2 raydistill@HEAD~1 raydistill@HEAD \\
        --out benchmarks/results/step_ab.json

Each `variant@rev` is bench_step.py's variant run by that commit's code: the commit is checked out into a temporary
git worktree and served by its own benchmarks/bench_step.py (`--serve`) in a fresh process whose PYTHONPATH puts
that tree first, with the allocator setting bench_step gives the variant. So a lever that has no switch (it is just
the code now) is measured against the commit before it, on the same machine, seeds and rounds. The first entry is
the baseline of the ratios ("vs first": median of per-round ratios). Run it from this repository's environment;
the commits must have bench_step.py's `--serve` (2026-12-07 on).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import REUSE, Child, machine, write_result  # noqa: E402

from raydistill.methods.base import task_seed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


class TreeChild(Child):
    """bench_step's Child, served by another commit's tree."""

    def __init__(self, tree: Path, key: str, variant: str, threads: int):
        self.variant = variant
        env = Child.environment(variant)
        env["PYTHONPATH"] = str(tree)
        self.proc = subprocess.Popen([sys.executable, str(tree / "benchmarks" / "bench_step.py"), "--serve", key,
                                      "--device", "cpu", "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("entries", nargs="+", metavar="VARIANT@REV")
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/step_ab.json")
    args = ap.parse_args()
    entries = []
    for entry in args.entries:
        variant, sep, rev = entry.partition("@")
        if not sep or not variant or not rev:
            ap.error(f"{entry!r}: write VARIANT@REV, e.g. raydistill@HEAD~1")
        try:
            entries.append((entry, variant, git("rev-parse", "--verify", rev + "^{commit}")))
        except subprocess.CalledProcessError:
            ap.error(f"{entry!r}: {rev!r} is not a commit of {ROOT}")
    with tempfile.TemporaryDirectory(prefix="raydistill-ab-") as tmp:
        trees = {}
        for sha in dict.fromkeys(sha for _, _, sha in entries):
            trees[sha] = Path(tmp) / sha[:12]
            git("worktree", "add", "--detach", str(trees[sha]), sha)
        try:
            children = {label: TreeChild(trees[sha], args.config, variant, args.threads)
                        for label, variant, sha in entries}
            memory = {label: c.ask("memory", task_seed(0, 1000, 0))["peak_extra_mib"] for label, c in children.items()}
            seconds: dict[str, list[float]] = {label: [] for label in children}
            for i in range(args.repeats):
                for label, child in children.items():
                    seconds[label].append(child.ask("run", task_seed(0, i, 0))["seconds"])
                print(f"round {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in seconds.items()),
                      flush=True)
            for child in children.values():
                child.close()
        finally:
            for tree in trees.values():
                git("worktree", "remove", "--force", str(tree))
    first = entries[0][0]
    rows = {label: {"variant": variant, "commit": sha, "subject": git("log", "-1", "--format=%s", sha),
                    "allocator": "reuse" if variant in REUSE else "default",
                    "seconds_per_meta_step": round(statistics.median(seconds[label]), 4),
                    "seconds_all": [round(x, 4) for x in seconds[label]], "peak_extra_mib": memory[label],
                    "vs_first": round(statistics.median([a / b for a, b in zip(seconds[first], seconds[label])]), 3)}
            for label, variant, sha in entries}
    for label, row in rows.items():
        print(f"{label:28s} {row['seconds_per_meta_step']:8.3f} s  vs {first}: {row['vs_first']:.3f}x  "
              f"{row['peak_extra_mib']} MiB")
    write_result({"benchmark": "bench_ab", "machine": machine(torch.device("cpu")), "config": args.config,
                  "repeats": args.repeats, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
