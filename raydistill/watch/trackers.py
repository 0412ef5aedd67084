"""Experiment trackers (MLflow, Weights & Biases, TensorBoard): the `trackers:` list of a run config or sweep file.

Each entry is a name or a mapping of the name and its options:

    trackers:
      - tensorboard                                          # every run writes event files anyway
      - {name: mlflow, tracking_uri: "sqlite:///mlflow.db"}
      - {name: wandb, project: fmnist, mode: offline}

A sweep hands them to Ray Tune's logger callbacks (raydistill.tune.experiment); a plain run logs through Ray's
integration functions, setup_mlflow and setup_wandb (raydistill.watch.run). Both are Ray's own code: there
is no hand-made client here. The trackers are optional extras (`pip install 'raydistill[mlflow]'`,
`'raydistill[wandb]'`); credentials never go in a file: W&B reads WANDB_API_KEY (or runs offline), MLflow its
MLFLOW_TRACKING_* variables.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from raydistill.config.errors import ConfigError

# name -> (the module it needs, its extra); the entries' options are checked with the config (raydistill.config.checks)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboardX", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


def wandb_mode(entry: dict) -> str:
    return entry.get("mode") or os.environ.get("WANDB_MODE") or "online"


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` keeps it)."""
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


def check_usable(trackers: list[dict], key: str = "trackers") -> None:
    """On the machine that logs (the driver): each tracker's package is installed and W&B online has a key."""
    for index, entry in enumerate(trackers):
        name, where = entry["name"], f"{key}[{index}]"
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{where}: {name} needs the {module} package; pip install 'raydistill[{extra}]'")
        if name == "wandb" and wandb_mode(entry) == "online" and not wandb_logged_in():
            raise ConfigError(f"{where}: W&B online needs an API key; set WANDB_API_KEY (or run wandb login), or "
                              "log offline with mode: offline (upload later with wandb sync)")


def options(entry: dict) -> dict:
    """A checked entry's options (everything but its name)."""
    return {key: value for key, value in entry.items() if key != "name"}


def merged(*lists: list[dict]) -> list[dict]:
    """Checked tracker lists combined by name; an entry in a later list replaces one of the same name."""
    out: dict[str, dict] = {}
    for entries in lists:
        out.update({entry["name"]: entry for entry in entries})
    return list(out.values())


def use_wandb_mode(entry: dict) -> None:
    """Ray's W&B integration asks for an API key unless WANDB_MODE says offline or disabled: set it from the entry."""
    if wandb_mode(entry) != "online":
        os.environ["WANDB_MODE"] = wandb_mode(entry)
