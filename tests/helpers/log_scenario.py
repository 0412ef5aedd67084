"""A driver for tests/integration/test_watching_on_ray.py: `raydistill distill` as a Ray job would run it, one
worker killed mid-run.

Usage: python log_scenario.py RUN_DIR (joins RAY_ADDRESS; the output goes wherever the test sends it).
"""

import functools
import os
import signal
import sys
import tempfile
from pathlib import Path

from raydistill import cli
from raydistill.engine import driver
from raydistill.engine.worker import GradientWorker


def marker(seed: int) -> Path:
    """Where the worker notes that it died; named by the run's seed, which every worker process knows."""
    return Path(tempfile.gettempdir()) / f"raydistill-log-scenario-{seed}"


class DiesAtStep3(GradientWorker):
    """Slot 1 kills its own process the first time it reaches step 3."""

    def compute(self, data, snapshot, step, slot):
        died = marker(self.cfg.seed)
        if step == 3 and slot == 1 and not died.exists():
            died.write_text("died")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().compute(data, snapshot, step, slot)


if __name__ == "__main__":
    run = Path(sys.argv[1])
    seed = os.getpid()  # a marker of this scenario's own
    # The CLI builds the run's Hooks (with its --fit): make them start this scenario's workers
    cli.Hooks = functools.partial(driver.Hooks, worker_cls=DiesAtStep3)
    overrides = ["steps=8", "ipc=1", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2", "ratbptt.real_batch=64",
                 "eval.every=4", "eval.val_models=1", "eval.val_steps=5", "eval.num_models=1", "eval.steps=5",
                 "data.val_size=200", "ray.workers=2", "ray.cpus_per_worker=1", "ray.worker_threads=1", "threads=1",
                 f"seed={seed}"]
    args = ["distill", "--preset", "quickstart", "--out", str(run), "--log-every", "0"]
    try:
        code = cli.main(args + [a for o in overrides for a in ("--set", o)])
    finally:
        marker(seed).unlink(missing_ok=True)
    sys.exit(code)
