"""The run directory: one self-describing folder per run (config, metrics, artifact, evaluation, image grid).

A run directory is a local path or a URI (raydistill.storage.store): file:///abs/path is the same folder as /abs/path;
s3://, gs://, ... are written through pyarrow.fs (or fsspec), every file atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from raydistill import __version__
from raydistill.config import ConfigError, DistillConfig
from raydistill.config.loading import load_yaml
from raydistill.data.registry import Dataset
from raydistill.setup import config_from_file, config_to_dict
from raydistill.storage.artifact import (
    DISTILLED_FILE,
    EVAL_FILE,
    METRICS_FILE,
    ArtifactError,
    DistilledSet,
    read_distilled,
    write_distilled,
    write_zca,
)
from raydistill.storage.atomic import atomic_write_json, atomic_write_text
from raydistill.storage.pictures import grid_images, save_grid
from raydistill.storage.store import Location, RunPath, location, one_line

ARTIFACT, METRICS, EVAL = DISTILLED_FILE, METRICS_FILE, EVAL_FILE
GRID = "grid.png"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"  # the parameter server's checkpoints, inside a run (or a Boost-DD stage) directory


def stage_dir(run_dir: RunPath, index: int) -> RunPath:
    """The run directory of Boost-DD stage `index` (0-based) inside the boosted run."""
    return location(run_dir) / f"stage-{index + 1}"


def resume_command(run_dir: str | Path | Location) -> str:
    """The command that continues the run in `run_dir` (the whole boosted run, for one of its stages)."""
    path = location(run_dir)
    if path.name.startswith("stage-") and (path.parent / CONFIG).is_file():
        return f"raydistill boost --resume {path.parent}"
    return f"raydistill distill --resume {path}"


def check_fresh(run_dir: str | Path | Location) -> RunPath:
    """The path of a run directory to create: missing or an empty folder; anything else is refused, untouched."""
    path = location(run_dir)
    if isinstance(path, Location):
        return _check_fresh_remote(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out: {path} is an existing file, not a directory; choose a new directory")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"--out: {path} already exists and is not empty; choose a new directory or remove it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out: {parent} is a file, so {path} cannot be created; choose another path")
            break
    return path


def _check_fresh_remote(path: Location) -> Location:
    try:
        if path.is_file():
            raise ConfigError(f"--out: {path} is an existing file, not a directory; choose a new directory")
        if next(path.iterdir(), None) is not None:
            raise ConfigError(f"--out: {path} already exists and is not empty; choose a new directory or remove it")
    except OSError as exc:
        raise ConfigError(f"--out: cannot reach {path} ({one_line(exc)}); check the URI and its credentials") from None
    return path


def open_run(out: str | Path | Location, cfg: DistillConfig | None, resume: bool) -> tuple[RunPath, DistillConfig | None]:
    """Where a run lives and its config, before anything is loaded or created: with `resume`, the config the run
    directory keeps (None when the run already finished: nothing to do); otherwise `cfg`, once `out` is known to
    hold no run (an existing run, or a file, is never written into)."""
    run = location(out)  # a local path, or a URI on storage every node sees (raydistill.storage.store)
    if resume:
        return run, resumable_config(run)
    check_fresh(run)
    return run, cfg


def create(run_dir: str | Path | Location, cfg: DistillConfig) -> RunPath:
    """Create a fresh run directory with its config.yaml; an existing non-empty one is never written into."""
    path = check_fresh(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out: cannot create {path} ({exc.strerror or one_line(exc)}); choose a writable "
                          "location") from None
    write_config(path, cfg)
    return path


def resumable_config(run_dir: RunPath) -> DistillConfig | None:
    """The config of an interrupted run to continue; None when the run already finished (it is left alone)."""
    run_dir = location(run_dir)
    try:
        if not (run_dir / CONFIG).is_file():
            raise ConfigError(f"--resume: {run_dir} holds no {CONFIG}; pass the directory of an earlier run")
        if (run_dir / ARTIFACT).exists():
            return None
        text = (run_dir / CONFIG).read_text()
    except OSError as exc:
        raise ConfigError(f"--resume: cannot read {run_dir} ({one_line(exc)}); check the URI and its "
                          "credentials") from None
    return config_from_file(load_yaml(text, str(run_dir / CONFIG)), str(run_dir / CONFIG))


def write_config(run_dir: RunPath, cfg: DistillConfig) -> None:
    """The run's config.yaml: the first file of a new run, so a location that cannot be written fails here."""
    try:
        atomic_write_text(run_dir / CONFIG, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {run_dir / CONFIG} ({exc.strerror or one_line(exc)}); choose a "
                          "writable location") from None


def save_distilled(
    run_dir: RunPath,
    learnables: dict[str, torch.Tensor],
    hard_labels: torch.Tensor,
    blocks: torch.Tensor | None,
    dataset: Dataset,
    cfg: DistillConfig,
    extra: dict | None = None,
) -> DistilledSet:
    """Write distilled.parquet (with its metadata), the ZCA transform if used, and a PNG grid of the images.

    Images and soft labels are columns; any other learnable tensor of the method is kept by name, as nested lists,
    under the metadata key "learned".
    """
    images = learnables["images"].detach().float().cpu()
    soft_labels = learnables.get("soft_labels")
    learned = {k: v.detach().cpu().tolist() for k, v in learnables.items() if k not in ("images", "soft_labels")}
    metadata = {
        "dataset": dataset.name,
        "class_names": list(dataset.class_names),
        "image_shape": list(dataset.image_shape),
        "normalisation": {"mean": list(dataset.mean), "std": list(dataset.std)},
        "zca": dataset.zca is not None,
        "ipc": cfg.ipc,
        "eval_recipe": config_to_dict(cfg.eval),
        "config": config_to_dict(cfg),
        "code_version": __version__,
        "method": cfg.method,
        **({"learned": learned} if learned else {}),
        **(extra or {}),
    }
    dset = DistilledSet(
        images=images,
        labels=hard_labels.detach().cpu().long(),
        soft_labels=None if soft_labels is None else soft_labels.detach().float().cpu(),
        blocks=torch.zeros(len(images), dtype=torch.int32) if blocks is None else blocks.cpu().int(),
        metadata=metadata,
    )
    run_dir = location(run_dir)
    if dataset.zca is not None:
        write_zca(run_dir, dataset.zca.to_arrays())
    write_distilled(run_dir / ARTIFACT, dset)
    save_grid(run_dir / GRID, grid_images(images, dset.labels, dataset), nrow=dataset.num_classes)
    return dset


def load_run(run_dir: str | Path | Location) -> tuple[DistilledSet, DistillConfig]:
    """The distilled set of a run and the config it was made with (validated again: paths may have moved)."""
    path = location(run_dir)
    try:
        found = path.is_dir()
    except OSError as exc:
        raise ConfigError(f"RUN_DIR: cannot reach {path} ({one_line(exc)}); check the URI and its credentials") from None
    if not found:
        raise ConfigError(f"RUN_DIR: {path} is not a directory; pass the --out folder of a 'raydistill distill' run")
    dset = read_distilled(path / ARTIFACT)
    if not isinstance(dset.metadata.get("config"), dict):
        raise ArtifactError(f"{path / ARTIFACT}: its metadata holds no config, so it cannot be evaluated again; "
                            "pass the run directory of a 'raydistill distill' run")
    cfg = config_from_file(dset.metadata["config"], str(path / ARTIFACT))
    return dset, cfg


def write_eval(run_dir: RunPath, report: dict) -> dict:
    """Write eval.json, keeping results already there for architectures this report did not cover."""
    path = location(run_dir) / EVAL
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("split") == report["split"] and old.get("ipc") == report["ipc"]:
            for key in ("results", "baseline"):
                report[key] = {**old.get(key, {}), **report[key]}
            for name, per_arch in (old.get("baselines") or {}).items():  # per baseline, then per architecture
                report.setdefault("baselines", {})[name] = {**per_arch, **report["baselines"].get(name, {})}
    atomic_write_json(path, report)
    return report


def targets_of(dset: DistilledSet) -> torch.Tensor:
    return dset.soft_labels if dset.soft_labels is not None else dset.labels
