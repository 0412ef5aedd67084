"""Distillation in one process: the RaT-BPTT outer loop, validation-based selection, the artifact and its report.

The CLI runs distillation on Ray (raydistill.distributed.engine); this loop is the reference it must match bit for bit with one
worker, and a Ray-free entry point for notebooks and debugging. The helpers here are shared by both.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from raydistill.io import run_dir as rundir
from raydistill.io.atomic import append_jsonl
from raydistill.config.core import DistillConfig, validate_against_data
from raydistill.data.registry import Dataset, load_dataset
from raydistill.eval.evaluate import evaluate_set, evaluation_report, format_report, network_for, random_real_subset
from raydistill.methods.ratbptt.meta_gradient import ModelFactory, meta_gradient, task_seed
from raydistill.synset.meta_update import MetaOptimizer
from raydistill.runtime import resolve_device, set_threads


@dataclass
class SyntheticSet:
    images: Tensor
    hard_labels: Tensor
    soft_labels: Tensor | None
    blocks: Tensor | None = None  # Boost-DD block of each image (None: one block)
    lr_scale: Tensor | None = None  # meta lr multiplier of each image (None: all 1)


def init_synthetic(cfg: DistillConfig, dataset: Dataset) -> SyntheticSet:
    """IPC images per class, class-major: Gaussian noise scaled to unit L2 norm per image, or real samples."""
    hard = torch.arange(dataset.num_classes).repeat_interleave(cfg.ipc)
    if cfg.init.mode == "real":
        images, _ = random_real_subset(dataset, cfg.ipc, seed=cfg.seed)
    else:
        rng = torch.Generator().manual_seed(cfg.seed)
        images = torch.randn(len(hard), *dataset.image_shape, generator=rng)
        images = images / images.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    soft = F.one_hot(hard, dataset.num_classes).float() if cfg.labels.learn else None
    return SyntheticSet(images.clone(), hard, soft)


def model_factory(cfg: DistillConfig, dataset: Dataset) -> ModelFactory:
    return functools.partial(network_for, cfg.model.name, cfg, dataset)


def load_checked(cfg: DistillConfig) -> Dataset:
    dataset = load_dataset(cfg.data)
    validate_against_data(cfg, dataset.num_train, dataset.num_classes, len(dataset.val_y))
    return dataset


def validation_accuracy(syn: SyntheticSet, dataset: Dataset, cfg: DistillConfig, device: torch.device) -> float:
    targets = syn.soft_labels if syn.soft_labels is not None else syn.hard_labels
    acc = evaluate_set(syn.images, targets, dataset, cfg, cfg.model.name, cfg.eval.val_models, cfg.eval.val_steps,
                       "val", seed=cfg.seed + 30_000, device=device)
    return acc.mean


def distill(cfg: DistillConfig, out: str | Path, progress: bool = True, evaluate: bool = True) -> dict:
    """Run a whole distillation into the fresh directory `out`; returns the summary printed by the CLI."""
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dataset = load_checked(cfg)
    run = rundir.prepare(out)
    rundir.write_config(run, cfg)

    syn = init_synthetic(cfg, dataset)
    meta = MetaOptimizer(syn.images.to(device), None if syn.soft_labels is None else syn.soft_labels.to(device), cfg.meta)
    hard = syn.hard_labels.to(device)
    real_x, real_y = dataset.train_x.to(device), dataset.train_y.to(device)
    factory = model_factory(cfg, dataset)

    def snapshot() -> SyntheticSet:
        return SyntheticSet(meta.images.clone(), hard, None if meta.soft_labels is None else meta.soft_labels.clone())

    best: tuple[float, int, SyntheticSet] | None = None
    began = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="distill", unit="step", disable=not progress, dynamic_ncols=True)
    for step in range(cfg.steps):
        g = meta_gradient(meta.images, hard, meta.soft_labels, real_x, real_y, factory, cfg.ratbptt, cfg.augment,
                          task_seed(cfg.seed, step, 0))
        report = meta.step(g.images, g.labels)
        record = {"step": step + 1, "meta_loss": g.meta_loss, "start": g.start, "window": g.window,
                  "grad_norm": report.grad_norm, "applied": report.applied, "skipped": meta.skipped,
                  "seconds": round(g.seconds, 4)}
        append_jsonl(run / rundir.METRICS, record)
        postfix = {"meta_loss": f"{g.meta_loss:.3f}"}
        if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.steps):
            snap = snapshot()
            acc = validation_accuracy(snap, dataset, cfg, device)
            append_jsonl(run / rundir.METRICS, {"step": step + 1, "val_acc": acc})
            postfix["val"] = f"{acc:.1f}"
            if best is None or acc > best[0]:
                best = (acc, step + 1, snap)
        bar.set_postfix(postfix)
        bar.update()
    bar.close()

    chosen = best[2] if best is not None else snapshot()
    selected = {"selected_step": best[1] if best else cfg.steps, "val_acc": best[0] if best else None,
                "distill_seconds": round(time.perf_counter() - began, 1)}
    dset = rundir.save_distilled(run, chosen.images, chosen.hard_labels, chosen.soft_labels, None, dataset, cfg,
                                 extra=selected)
    summary = {"run_dir": str(run), **selected}
    if evaluate:
        report = run_evaluation(run, dset.images, rundir.targets_of(dset), cfg, dataset, device, progress=progress)
        summary["eval"] = report
    return summary


def run_evaluation(
    run: Path,
    images: Tensor,
    targets: Tensor,
    cfg: DistillConfig,
    dataset: Dataset,
    device: torch.device,
    archs: list[str] | None = None,
    num_models: int | None = None,
    progress: bool = True,
    write: bool = True,
) -> dict:
    """Evaluate a distilled set on the test split beside a random real subset; print (and write) the report."""
    archs = archs or cfg.eval.archs
    n = num_models or cfg.eval.num_models
    bar = tqdm(total=2 * n * len(archs), desc="evaluate", unit="net", disable=not progress, dynamic_ncols=True)
    report = evaluation_report(images, targets, cfg.ipc, dataset, cfg, device, archs, n, split="test", tick=bar.update)
    bar.close()
    if write:
        report = rundir.write_eval(run, report)
    print(format_report(report))
    return report
