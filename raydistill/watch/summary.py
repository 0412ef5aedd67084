"""What `raydistill show RUN_DIR` prints: what was distilled, how, and how well it evaluated."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from raydistill.config import DistillConfig
from raydistill.storage.artifact import BUDGETS_FILE, EVAL_FILE, METRICS_FILE, ArtifactError, read_distilled
from raydistill.storage.store import Location, RunPath, location, one_line
from raydistill.watch.tensorboard import TENSORBOARD, tensorboard_command

CONFIG_FIELDS = {f.name for f in dataclasses.fields(DistillConfig)}  # any other section is the method's


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _accuracy(entry: dict) -> str:
    return f"{entry['mean']:.1f} +- {entry['std']:.1f} %"  # eval.json holds percentages (raydistill.evaluate.report)


def _eval_lines(path: RunPath) -> list[str]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        baseline = report.get("baseline") or {}
        lines = [f"eval ({report.get('split', '?')} split):"]
        for arch, entry in report["results"].items():
            line = f"  {arch}: {_accuracy(entry)}"
            if arch in baseline:
                line += f" (random real subset: {_accuracy(baseline[arch])})"
            lines.append(line)
        return lines
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"eval:     {path.name} is unreadable ({type(exc).__name__}: {exc}); re-run 'raydistill eval'"]


def _budget_lines(path: RunPath) -> list[str]:
    """One line per nested budget of a Boost-DD set: distilled prefix vs a random subset of the same size."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        lines = ["budgets (test split, first k images per class by block):"]
        for k, body in report["budgets"].items():
            for arch, entry in body["results"].items():
                lines.append(f"  IPC {k} {arch}: {_accuracy(entry)} (random real subset: "
                             f"{_accuracy(body['baseline'][arch])})")
        return lines
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"budgets:  {path.name} is unreadable ({type(exc).__name__}: {exc}); re-run 'raydistill eval --budgets'"]


def _last_metrics(path: RunPath) -> str | None:
    # The last line can be half-written after a crash (append_jsonl is not atomic): use the last one that parses.
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return ", ".join(f"{key} {_fmt(value)}" for key, value in obj.items())
    return None


def _has_tensorboard(run: RunPath) -> bool:
    """Event files in the run, or (a boosted run) in one of its stages."""
    if isinstance(run, Path):
        return any(run.glob(f"**/{TENSORBOARD}"))
    return (run / TENSORBOARD).is_dir() or any(
        (stage / TENSORBOARD).is_dir() for stage in run.iterdir() if stage.name.startswith("stage-"))


def summarise(run_dir: str | os.PathLike | Location) -> str:
    """The text `raydistill show RUN_DIR` prints: what was distilled, how, and how well it evaluated."""
    run = location(run_dir)
    try:
        found = run.is_dir()
    except OSError as exc:
        raise ArtifactError(f"{run}: cannot be reached ({one_line(exc)}); check the location and its "
                            "credentials") from None
    if not found:
        raise ArtifactError(f"{run}: no such run directory; check the path or run 'raydistill distill' first")
    dset = read_distilled(run)  # the whole set is checked (labels in range, rows, shapes), not only its header
    meta, n, classes = dset.metadata, len(dset.labels), dset.num_classes
    lines = [
        f"run:      {run}",
        f"dataset:  {meta.get('dataset', 'unknown')} ({classes} classes)",
        f"images:   {n} ({meta.get('ipc', dset.ipc)} per class), shape {'x'.join(map(str, meta['image_shape']))}",
        f"labels:   {'learned (soft)' if dset.soft_labels is not None else 'hard'}",
    ]
    blocks, sizes = np.unique(dset.blocks.numpy(), return_counts=True)
    if len(blocks) == 1:
        lines.append("blocks:   1 (plain run)")
    else:
        lines.append(f"blocks:   {len(blocks)} (images per block: {', '.join(map(str, sizes))})")
    if "zca" in meta:
        lines.append(f"zca:      {'yes' if meta['zca'] else 'no'}")
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    metaopt = cfg.get("meta") or {}
    method = meta.get("method", cfg.get("method", "ratbptt"))
    section = next((v for k, v in cfg.items() if k not in CONFIG_FIELDS and isinstance(v, dict)), {})
    parts = [f"method {method}"] + [f"{key} {_fmt(value)}" for key, value in section.items() if value is not None]
    if "lr" in metaopt:
        parts.append(f"meta lr {_fmt(metaopt['lr'])}")
    lines.append(f"config:   {', '.join(parts)}")
    if "code_version" in meta:
        lines.append(f"code:     raydistill {meta['code_version']}")
    if (run / EVAL_FILE).is_file():
        lines.extend(_eval_lines(run / EVAL_FILE))
    if (run / BUDGETS_FILE).is_file():
        lines.extend(_budget_lines(run / BUDGETS_FILE))
    if (run / METRICS_FILE).is_file():
        last = _last_metrics(run / METRICS_FILE)
        if last is not None:
            lines.append(f"last:     {last}")
    if _has_tensorboard(run):  # the run's own, or a boosted run's stages
        lines.append(f"curves:   {tensorboard_command(run)}  (pip install tensorboard to view)")
    return "\n".join(lines)
