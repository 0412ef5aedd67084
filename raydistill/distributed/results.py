"""The end of a run: the artifact of its selected snapshot, and the final evaluation on the test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch
from torch import Tensor

from raydistill.config import DistillConfig
from raydistill.data.registry import Dataset
from raydistill.distributed.evaluation import evaluation_report_on_ray
from raydistill.eval.report import evaluation_report, format_report, network_count
from raydistill.io import run_dir as rundir
from raydistill.io.progress import progress_bar
from raydistill.runtime import resolve_device

EVAL_GPU_SHARE = 0.25  # one evaluation network is small: four share a GPU


def finish(cfg: DistillConfig, run: Path, dataset: Dataset, result: dict, status: dict, seconds: float,
           evaluate: bool, progress: bool, blocks: Tensor | None = None, on_ray: bool = True) -> dict:
    """Write the selected snapshot as the run's artifact, evaluate it if asked; the summary the CLI prints."""
    learnables = {k: torch.tensor(np.asarray(v)) for k, v in result["learnables"].items()}
    extra = {"selected_step": result["selected_step"], "val_acc": result["val_acc"],
             "distill_seconds": round(seconds, 1), "dropped": status["dropped"],
             "workers": cfg.ray.workers, "mode": cfg.ray.mode}
    dset = rundir.save_distilled(run, learnables, torch.tensor(result["hard_labels"]), blocks, dataset, cfg,
                                 extra=extra)
    summary = {"run_dir": str(run), **extra, "status": status}
    if evaluate:
        summary["eval"] = run_evaluation(run, dset.images, rundir.targets_of(dset), cfg, dataset,
                                         progress=progress, on_ray=on_ray)
    return summary


def run_evaluation(run: Path, images: Tensor, targets: Tensor, cfg: DistillConfig, dataset: Dataset,
                   archs: list[str] | None = None, num_models: int | None = None, progress: bool = True,
                   write: bool = True, on_ray: bool = True) -> dict:
    """Evaluate a set on the test split beside the baselines; print (and write) the report.

    With Ray up (and `on_ray`), every network trains as its own Ray task; the report is the same as in process.
    """
    archs = archs or cfg.eval.archs
    n = num_models or cfg.eval.num_models
    bar = progress_bar(network_count(cfg, archs, n), "evaluate", unit="net", enabled=progress)
    if on_ray and ray.is_initialized():
        gpus = {"num_gpus": EVAL_GPU_SHARE, "num_cpus": 1, "max_retries": 3} if ray.cluster_resources().get("GPU", 0) > 0 else None
        report = evaluation_report_on_ray(images, targets, cfg.ipc, dataset, cfg, archs, n, split="test",
                                          tick=bar.update, options=gpus)
    else:
        report = evaluation_report(images, targets, cfg.ipc, dataset, cfg, resolve_device(cfg.device), archs, n,
                                   split="test", tick=bar.update)
    bar.close()
    if write:
        report = rundir.write_eval(run, report)
    print(format_report(report))
    return report
