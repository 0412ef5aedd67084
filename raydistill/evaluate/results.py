"""The end of a run: the artifact of its selected snapshot, and the final evaluation on the test split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from torch import Tensor

from raydistill.config import DistillConfig
from raydistill.data.registry import Dataset
from raydistill.evaluate.remote import evaluation_report_on_ray
from raydistill.evaluate.report import ReportOptions, evaluation_report, format_report, network_count
from raydistill.runtime import SMALL_NETWORK_GPU_SHARE, resolve_device
from raydistill.storage import run_dir as rundir
from raydistill.watch.progress import progress_bar


@dataclass(frozen=True)
class RunOutcome:
    """What a finished run hands to `finish`: the server's result (selected snapshot) and status, the seconds the
    distillation took, and the set's Boost-DD blocks (None for a plain run)."""

    result: dict
    status: dict
    seconds: float
    blocks: Tensor | None = None


@dataclass(frozen=True)
class EvalOptions:
    """How a set is evaluated on the test split: `archs` / `num_models` (default: cfg.eval's), a progress bar,
    whether the report is written to the run (eval.json), and whether the networks train as Ray tasks (when Ray is
    up)."""

    archs: list[str] | None = None
    num_models: int | None = None
    progress: bool = True
    write: bool = True
    on_ray: bool = True


def finish(cfg: DistillConfig, run: Path, dataset: Dataset, outcome: RunOutcome,
           evaluation: EvalOptions | None) -> dict:
    """Write the selected snapshot as the run's artifact, evaluate it unless `evaluation` is None; the summary the
    CLI prints."""
    result, status = outcome.result, outcome.status
    learnables = {k: torch.tensor(np.asarray(v)) for k, v in result["learnables"].items()}
    extra = {"selected_step": result["selected_step"], "val_acc": result["val_acc"],
             "distill_seconds": round(outcome.seconds, 1), "dropped": status["dropped"],
             "workers": cfg.ray.workers, "mode": cfg.ray.mode}
    dset = rundir.save_distilled(run, learnables, torch.tensor(result["hard_labels"]), outcome.blocks, dataset, cfg,
                                 extra=extra)
    summary = {"run_dir": str(run), **extra, "status": status}
    if evaluation is not None:
        summary["eval"] = run_evaluation(run, dset.images, rundir.targets_of(dset), cfg, dataset, evaluation)
    return summary


def run_evaluation(run: Path, images: Tensor, targets: Tensor, cfg: DistillConfig, dataset: Dataset,
                   options: EvalOptions = EvalOptions()) -> dict:
    """Evaluate a set on the test split beside the baselines; print (and write) the report.

    With Ray up (and `options.on_ray`), every network trains as its own Ray task; the report is the same as in
    process.
    """
    archs = options.archs or cfg.eval.archs
    n = options.num_models or cfg.eval.num_models
    progress, write, on_ray = options.progress, options.write, options.on_ray
    bar = progress_bar(network_count(cfg, archs, n), "evaluate", unit="net", enabled=progress)
    if on_ray and ray.is_initialized():
        gpus = {"num_gpus": SMALL_NETWORK_GPU_SHARE, "num_cpus": 1, "max_retries": 3} if ray.cluster_resources().get("GPU", 0) > 0 else None
        report = evaluation_report_on_ray(images, targets, cfg.ipc, dataset, cfg,
                                          ReportOptions(archs, n, split="test", tick=bar.update), ray_options=gpus)
    else:
        report = evaluation_report(images, targets, cfg.ipc, dataset, cfg,
                                   ReportOptions(archs, n, split="test", tick=bar.update,
                                                 device=resolve_device(cfg.device)))
    bar.close()
    if write:
        report = rundir.write_eval(run, report)
    print(format_report(report))
    return report
