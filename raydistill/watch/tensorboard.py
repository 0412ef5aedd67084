"""TensorBoard event files in every run directory: curves of the run, and the synthetic images as they form.

The driver writes them beside metrics.jsonl, under RUN/tensorboard (`tensorboard --logdir RUN`; a boosted run's
stages appear as one TensorBoard run each). Tags:

- `distill/meta_loss`, `distill/grad_norm`, `distill/steps_per_s`, `distill/val_acc`;
- `distill/dropped_nonfinite` and, in async mode, `distill/dropped_stale` (dropped gradients so far);
- `method/<name>` for every numeric statistic the method reports (RaT-BPTT: `method/start`, `method/window`),
  averaged over the step's workers;
- `images/synthetic`: the image grid (one column per class) of the snapshot each validation scores.

A resumed run purges what an earlier session wrote from the step it continues at (those steps are redone), so the
curves do not fold back on themselves. Event files are written with tensorboardX (a dependency of Ray Tune).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

TENSORBOARD = "tensorboard"  # the folder inside a run directory
RECORD_SCALARS = ("meta_loss", "grad_norm", "dropped_nonfinite", "dropped_stale")


def tensorboard_command(run_dir: str | Path) -> str:
    """The command that shows a run (or a boosted run's stages, or a sweep's trials) in TensorBoard."""
    return f"tensorboard --logdir {run_dir}"


def mean_stats(stats: list[dict]) -> dict[str, float]:
    """The numeric statistics of a step's workers, averaged per name (non-numeric ones are left out)."""
    values: dict[str, list[float]] = {}
    for worker in stats:
        for name, value in (worker or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values.setdefault(name, []).append(float(value))
    return {name: float(np.mean(v)) for name, v in values.items()}


def step_scalars(record: dict, steps_per_s: float | None) -> dict[str, float]:
    """The curves of one meta-step's metrics.jsonl record, by tag (what TensorBoard and the trackers log)."""
    out = {}
    for name in RECORD_SCALARS:
        value = record.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"distill/{name}"] = float(value)
    if steps_per_s is not None:
        out["distill/steps_per_s"] = steps_per_s
    out.update({f"method/{name}": value for name, value in mean_stats(record.get("stats", [])).items()})
    return out


class RunBoard:
    """The event-file writer of one run directory."""

    def __init__(self, run_dir: str | Path, start_step: int = 0):
        from tensorboardX import SummaryWriter  # 1.5 s to import: only runs pay it, not `raydistill show`

        # A file per session, named so that sessions sort in order even within one second (the default name has
        # whole seconds only: a restart in the same second would overwrite the file before it).
        self.writer = SummaryWriter(logdir=str(Path(run_dir) / TENSORBOARD), purge_step=start_step or None,
                                    flush_secs=30, filename_suffix=f".{time.time_ns()}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Curves by tag (a meta-step's: see step_scalars)."""
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def images(self, step: int, pixels: np.ndarray) -> None:
        """An image grid (height, width, C) as uint8 pixels."""
        if pixels.shape[2] == 1:
            pixels = np.repeat(pixels, 3, axis=2)  # TensorBoard shows RGB(A) images
        self.writer.add_image("images/synthetic", pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()
