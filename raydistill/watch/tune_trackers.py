"""Trackers of a sweep: Ray Tune's own logger callbacks for the `trackers:` of the sweep file and its base config.

Every trial appears in the tracker with its sampled parameters and, per report, its metrics (step, val_acc,
best_val_acc, meta_loss, ...). MLflow's experiment and W&B's project default to the sweep's name. The trials' own
runs then log to no tracker themselves, so nothing is logged twice. See raydistill.watch.trackers for the entries.
"""

from __future__ import annotations

import importlib

from ray.tune.logger import TBXLoggerCallback

from raydistill.watch.trackers import options, use_wandb_mode


def make_callbacks(trackers: list[dict], sweep_name: str) -> list:
    """Tune logger callbacks for checked tracker entries of a sweep named `sweep_name`."""
    callbacks = []
    for entry in trackers:
        kwargs = options(entry)
        if entry["name"] == "tensorboard":  # Tune adds it by default; naming it keeps it if that default goes
            callbacks.append(TBXLoggerCallback())
            continue
        # Ray's integration modules import the tracker's own package: only sweeps that name it pay for the import.
        integration = importlib.import_module(f"ray.air.integrations.{entry['name']}")
        if entry["name"] == "mlflow":
            kwargs.setdefault("experiment_name", sweep_name)
            callbacks.append(integration.MLflowLoggerCallback(**kwargs))
        else:
            kwargs.setdefault("project", sweep_name)
            use_wandb_mode(entry)
            callbacks.append(integration.WandbLoggerCallback(**kwargs))
    return callbacks
