"""The sweep's outputs: results.csv, the printed table, best.yaml and plot.png.

One row per trial that ran or was rejected, best first, with its status: `done` (ran to the end), `stopped` (early, by
ASHA), `error` (failed past max_failures) or `rejected` (the config validator refused the sample; never started).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raydistill.setup import config_to_dict
from raydistill.storage.atomic import atomic_write_bytes, atomic_write_text
from raydistill.storage.store import RunPath, location
from raydistill.tune.sweep import REJECTED, RUNG_METRIC, TIME_ATTR, TOTAL_ATTR, Sweep, trial_config

STATUS_ORDER = {"done": 0, "stopped": 1, "error": 2, "rejected": 3}


def result_rows(sweep: Sweep, grid) -> list[dict]:
    """One row per trial of Tune's ResultGrid, sorted by the metric, best first."""
    rows = [_row(sweep, result) for result in grid]
    rows.sort(key=lambda r: (r[sweep.metric] is None, -(r[sweep.metric] or 0), STATUS_ORDER[r["status"]], r["trial"]))
    return rows


def _row(sweep: Sweep, result) -> dict:
    row = {"trial": result.path.rstrip("/").rsplit("/", 1)[-1], **{k: result.config.get(k) for k in sweep.search}}
    metrics = result.metrics or {}
    if metrics.get(REJECTED):
        return {**row, "status": "rejected", sweep.metric: None, "note": metrics[REJECTED]}
    step, steps = metrics.get(TIME_ATTR), metrics.get(TOTAL_ATTR)
    value = _round(metrics.get(sweep.metric))
    if result.error is not None:
        status, note = "error", str(result.error).strip().splitlines()[-1][:200]
    elif step is not None and steps is not None and step >= steps:
        status, note = "done", ""
    else:
        status, note = "stopped", f"stopped early by {sweep.scheduler['name'].upper()} at step {step}"
    if status != "done" and sweep.metric != RUNG_METRIC:
        value = None  # budget metrics exist only for finished boosting trials
    checkpoint = result.checkpoint.path if result.checkpoint is not None else ""
    return {**row, "status": status, sweep.metric: value, RUNG_METRIC: _round(metrics.get(RUNG_METRIC)),
            TIME_ATTR: step, "steps": steps, "resumed_from": metrics.get("resumed_from"), "checkpoint": checkpoint,
            "note": note}


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def params_text(params: dict) -> str:
    return "{" + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) + "}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def output_dir(sweep: Sweep, out: str | os.PathLike | None) -> RunPath:
    """Where the outputs go: `out` (a path or a URI), else the experiment folder (or runs/tune/NAME for remote
    storage)."""
    if out is not None:
        return location(out)
    if "://" in sweep.storage:
        return Path("runs") / "tune" / sweep.name
    return Path(sweep.experiment_path())


def write_outputs(sweep: Sweep, grid, out: str | os.PathLike | None = None) -> dict:
    """Write results.csv, best.yaml and plot.png, print the table; returns rows, best row and the paths."""
    folder = output_dir(sweep, out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = result_rows(sweep, grid)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "results.csv", text.getvalue())
    print(summary_table(sweep, rows))
    summary = {"rows": rows, "results": str(folder / "results.csv"), "best": None, "best_preset": None, "plot": None}
    finished = [r for r in rows if r["status"] == "done" and r[sweep.metric] is not None]
    if finished:
        best = finished[0]
        swept = {k: best[k] for k in sweep.search}
        cfg, _ = trial_config(sweep, swept, check_paths=False)
        command = f"raydistill {'boost' if cfg.boost.stages else 'distill'} --preset {folder / 'best.yaml'}"
        header = (f"# Best trial {best['trial']} of sweep {sweep.name} ({sweep.source}): {sweep.metric} = "
                  f"{best[sweep.metric]:.2f} % on the validation split.\n"
                  f"# Swept: {params_text(swept)}\n"
                  f"# Use: {command}\n")
        atomic_write_text(folder / "best.yaml", header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        summary.update(best=best, best_preset=str(folder / "best.yaml"))
        print(f"best: {best['trial']} {params_text(swept)} {sweep.metric} {best[sweep.metric]:.2f}")
        print(f"best preset: {folder / 'best.yaml'}  ({command})")
    summary["plot"] = plot(sweep, rows, folder / "plot.png")
    print(f"results: {folder / 'results.csv'}" + (f"; plot: {summary['plot']}" if summary["plot"] else ""))
    return summary


def summary_table(sweep: Sweep, rows: list[dict]) -> str:
    """The rows as an aligned text table, best first; a row that did not finish says why in its last column."""
    keys = list(sweep.search)
    head = ["rank", "trial", *keys, sweep.metric, "steps", "status"]
    lines = [head]
    for rank, r in enumerate(rows, 1):
        value = r[sweep.metric]
        steps = "" if r.get(TIME_ATTR) is None else f"{r[TIME_ATTR]}/{r['steps']}"
        status = r["status"] if r["status"] == "done" else f"{r['status']}: {r['note']}"
        lines.append([str(rank), r["trial"], *(_fmt(r[k]) for k in keys),
                      "" if value is None else f"{value:.2f}", steps, status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def plot(sweep: Sweep, rows: list[dict], path: RunPath) -> str | None:
    """The metric against each swept parameter: filled dots ran to the end, hollow ones were stopped early."""
    try:
        import matplotlib  # here, not at the top: only the plot needs it, and it is slow to import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    keys = list(sweep.search)
    ran = [r for r in rows if r["status"] in ("done", "stopped") and r[RUNG_METRIC] is not None]
    if not ran:
        return None
    grid_keys = [k for k in keys if sweep.search[k][0] == "grid"]
    panels = len(keys) + (len(grid_keys) == 2)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.4), squeeze=False)
    if len(grid_keys) == 2:
        heatmap(axes[0][-1], sweep, rows, *grid_keys)
    for ax, key in zip(axes[0], keys):
        kind, _ = sweep.search[key]
        values = [r[key] for r in ran]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values}) if not numeric else None
        for done in (True, False):
            pts = [r for r in ran if (r["status"] == "done") == done]
            metric = sweep.metric if done else RUNG_METRIC
            xs = [r[key] if numeric else labels.index(str(r[key])) for r in pts]
            ys = [r[metric] if r[metric] is not None else r[RUNG_METRIC] for r in pts]
            ax.scatter(xs, ys, s=36, facecolors="C0" if done else "none", edgecolors="C0",
                       label="ran to the end" if done else "stopped early")
        if kind == "loguniform":
            ax.set_xscale("log")
        elif numeric and kind in ("grid", "choice"):
            ax.set_xticks(sorted(set(values)))
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{sweep.metric} (validation, %)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[0][0].set_title("stopped trials: val_acc when stopped", fontsize=8)
    fig.suptitle(f"sweep {sweep.name}")
    fig.tight_layout()
    picture = io.BytesIO()
    fig.savefig(picture, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, picture.getvalue())
    return str(path)


def heatmap(ax, sweep: Sweep, rows: list[dict], xkey: str, ykey: str) -> None:
    """The metric over a two-parameter grid; each cell shows its value, "(stopped)" or "invalid"."""
    xs, ys = sweep.search[xkey][1], sweep.search[ykey][1]
    values = np.full((len(ys), len(xs)), np.nan)
    notes: dict = {}
    for r in rows:
        cell = (ys.index(r[ykey]), xs.index(r[xkey]))
        if r["status"] == "rejected":
            notes.setdefault(cell, "invalid")
            continue
        value = r[sweep.metric] if r["status"] == "done" else r.get(RUNG_METRIC)
        if value is not None and not value <= values[cell]:  # the best sample of the cell
            values[cell] = value
            notes[cell] = f"{value:.1f}" + ("" if r["status"] == "done" else "\n(stopped)")
    image = ax.imshow(values, origin="lower", cmap="viridis", aspect="auto")
    for (i, j), text in notes.items():
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if text != "invalid" else "grey")
    ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs])
    ax.set_yticks(range(len(ys)), [_fmt(y) for y in ys])
    ax.set_xlabel(xkey)
    ax.set_ylabel(ykey)
    ax.figure.colorbar(image, ax=ax, label=sweep.metric)
