"""Watching a run from the driver: TensorBoard event files, and the config's experiment trackers.

`RunWatch` is what the driver calls: every meta-step's curves and every validation go to the run's TensorBoard files
(raydistill.watch.tensorboard) and to the trackers, with an image grid of the synthetic set per validation.

A plain run's trackers log through Ray's integration functions.

`setup_mlflow` and `setup_wandb` (ray.air.integrations) start one tracker run per session of a run directory, named
after it, with the flattened config as its parameters; the driver then logs the same curves as TensorBoard (see
raydistill.watch.tensorboard.step_scalars) and each validation's accuracy. MLflow's experiment and W&B's project default
to "raydistill"; W&B writes under the run directory unless the entry names `dir`. `tensorboard` needs nothing here:
every run writes event files. Inside a Tune trial the sweep's callbacks log instead (raydistill.watch.tune_trackers).
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydistill.config import ConfigError, DistillConfig
from raydistill.data.registry import Dataset
from raydistill.setup import config_to_dict
from raydistill.storage.pictures import display_grid
from raydistill.storage.run_dir import resume_command
from raydistill.storage.store import local_dir
from raydistill.watch.tensorboard import RunBoard, step_scalars
from raydistill.watch.trackers import options, use_wandb_mode

DEFAULT_PROJECT = "raydistill"


def flat_params(cfg: DistillConfig) -> dict[str, Any]:
    """The config as dotted keys (ratbptt.window, meta.lr, ...): what a tracker shows as a run's parameters."""
    out: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}{key}.", value)
        else:
            out[prefix.rstrip(".")] = node if isinstance(node, (int, float, str, bool)) or node is None else str(node)

    visit("", {k: v for k, v in config_to_dict(cfg).items() if k != "trackers"})
    return out


def start_tracker(entry: dict, params: dict[str, Any], run: Path) -> Any:
    """One tracker run through Ray's integration (mlflow: the mlflow module; wandb: a wandb Run)."""
    kwargs = options(entry)
    if entry["name"] == "mlflow":
        integration = importlib.import_module("ray.air.integrations.mlflow")  # imports mlflow itself
        return integration.setup_mlflow(
            params, tracking_uri=kwargs.get("tracking_uri"),
            experiment_name=kwargs.get("experiment_name", DEFAULT_PROJECT), run_name=run.name,
            create_experiment_if_not_exists=True, tags=kwargs.get("tags"))
    integration = importlib.import_module("ray.air.integrations.wandb")  # imports wandb itself
    use_wandb_mode(entry)
    kwargs.pop("log_config", None)
    kwargs.pop("excludes", None)
    kwargs.setdefault("project", DEFAULT_PROJECT)
    kwargs.setdefault("dir", str(run))
    return integration.setup_wandb(params, name=run.name, **kwargs)


class RunTrackers:
    """The trackers of one run session; `log` and `close` do nothing when the config names none."""

    def __init__(self, cfg: DistillConfig, run: Path):
        self.loggers: list[tuple[str, Any]] = []
        params = flat_params(cfg)
        for entry in cfg.trackers:
            try:
                self.loggers.append((entry["name"], start_tracker(entry, params, run)))
            except Exception as exc:  # noqa: BLE001  (a bad URI, a store that refuses: before any step runs)
                self.close()
                message = str(exc).splitlines()[0] if str(exc) else ""
                raise ConfigError(f"trackers: {entry['name']} could not start ({type(exc).__name__}: {message}); "
                                  f"fix its settings or drop it, then continue with: {resume_command(run)}") from None

    def log(self, values: dict[str, float], step: int) -> None:
        """Log to every tracker; one that fails (a server down, a full disk) is reported in one line and dropped:
        a tracker never stops a distillation, whose own record is metrics.jsonl."""
        for kind, logger in list(self.loggers):
            try:
                if kind == "mlflow":
                    logger.log_metrics(values, step=step)
                else:
                    logger.log(values, step=step)
            except Exception as exc:  # noqa: BLE001  (any tracker failure; the run goes on without it)
                self.loggers.remove((kind, logger))
                print(f"raydistill: warning: {kind} stopped logging at step {step} ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); the run goes on, metrics.jsonl has every "
                      "step", file=sys.stderr)

    def close(self) -> None:
        for kind, logger in self.loggers:
            try:
                logger.end_run() if kind == "mlflow" else logger.finish()
            except Exception as exc:  # noqa: BLE001
                print(f"raydistill: warning: {kind} did not close cleanly ({type(exc).__name__})", file=sys.stderr)
        self.loggers = []


class RunWatch:
    """TensorBoard and trackers of one run session, fed by the driver."""

    def __init__(self, cfg: DistillConfig, run: Path, dataset: Dataset):
        # TensorBoard writes local files: the run itself, or for a run on a URI a local folder that the driver copies
        # into it at the end of the session (raydistill.storage.store.publish_local_dir).
        self.run = local_dir(run)
        self.dataset = dataset  # to show images as they look (normalisation, ZCA)
        self.trackers = RunTrackers(cfg, run)
        self.board: RunBoard | None = None
        self.last_logged = -1  # the last step in the event files
        self.last_step_time: float | None = None

    def restart(self, step: int) -> None:
        """The run (re)starts at `step`: the event files drop the steps about to be redone."""
        if self.board is None or step < self.last_logged:
            if self.board is not None:
                self.board.close()
            self.board = RunBoard(self.run, step)
        self.last_step_time = None

    def step(self, record: dict, timed: bool = True) -> None:
        """A meta-step's metrics record (steps/s measured between consecutive timed records; a line recovered from a
        checkpoint after a restart is not timed)."""
        now = time.perf_counter()
        rate = None if self.last_step_time is None or not timed else 1.0 / max(now - self.last_step_time, 1e-9)
        self.last_step_time = now if timed else None
        values = step_scalars(record, rate)
        self.board.scalars(values, record["step"])
        self.trackers.log(values, record["step"])
        self.last_logged = record["step"]

    def images(self, step: int, snapshot: dict) -> None:
        """The grid of a snapshot sent to validation."""
        images, labels = (torch.tensor(np.asarray(snapshot[key])) for key in ("images", "hard_labels"))
        self.board.images(step, display_grid(images, labels, self.dataset))

    def validation(self, step: int, acc: float) -> None:
        self.board.scalars({"distill/val_acc": acc}, step)
        self.trackers.log({"distill/val_acc": acc}, step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        self.trackers.close()
