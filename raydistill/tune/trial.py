"""One trial: the Tune trainable, its placement group, its reports and checkpoints, and its restart.

A trial first builds and checks its sample's config. An invalid sample (window > unroll, a budget above the
schedule's IPC, a batch larger than the data) is *rejected*: it reports once, with the worst score and the
validator's reason, and returns before any worker or parameter server starts. A valid one runs one distillation or
Boost-DD run in its placement group and reports validation accuracy every `eval.every` meta-steps, each report with
a checkpoint of the run directory; a failed trial restarts from the last of those checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from raydistill.compat import RAY_TRAIN_STORAGE_LOGGERS
from raydistill.config import ConfigError, DistillConfig
from raydistill.engine.boost import boost
from raydistill.engine.cluster import TrialPlacement, worker_bundle
from raydistill.engine.driver import Hooks, distill
from raydistill.engine.memory import fit_changes
from raydistill.engine.worker import GradientWorker, validate_snapshot
from raydistill.setup import load_checked
from raydistill.storage.artifact import read_distilled
from raydistill.storage.checkpoint import checkpoint_step, list_checkpoints
from raydistill.storage.run_dir import ARTIFACT, CHECKPOINTS, stage_dir
from raydistill.synset.blocks import total_ipc
from raydistill.tune.sweep import REJECTED, RUNG_METRIC, TIME_ATTR, TOTAL_ATTR, Sweep, total_steps, trial_config

RUN = "run"  # the trial's run directory, inside the trial's working directory
# A rejected sample's score: 0 % validation accuracy, the floor of the metric, below any run that trains (those land
# near chance, 100 / classes %, at worst). Unlike -inf it is an ordinary number to every consumer: Tune's JSON results,
# ASHA's rung quantiles, Optuna's TPE (which only ranks the scores, so -inf would teach it nothing more). Optuna records
# it as a finished trial, not a failed one: TPE drops failed trials and would keep proposing the invalid region.
WORST_SCORE = 0.0
REJECTED_BUNDLE = {"CPU": 0.1}  # enough to read a config; a rejected trial should not wait for a free core


def checked_config(sweep: Sweep, params: dict[str, Any]) -> tuple[DistillConfig, list[int]]:
    """trial_config plus the checks against the data set (batch sizes, classes) and the memory check against what
    the cluster gives a worker (raydistill.plan.check); ConfigError when invalid or when it cannot fit."""
    cfg, budgets = trial_config(sweep, params)
    whole = dataclasses.replace(cfg, ipc=total_ipc(cfg))  # a boosted set holds every block
    fit_changes(whole, load_checked(whole), in_process=False, fit="check")
    return cfg, budgets


def trial_resources(cfg: DistillConfig, head_cpus: float, gpus: bool) -> tune.PlacementGroupFactory:
    """The trial's placement group: the head (trial driver + parameter server) and one bundle per worker."""
    head = {"CPU": head_cpus} if head_cpus > 0 else {}
    return tune.PlacementGroupFactory([head] + [worker_bundle(cfg.ray, gpus) for _ in range(cfg.ray.workers)],
                                      strategy="PACK")


def sample_resources(config: dict, sweep: Sweep, gpus: bool) -> tune.PlacementGroupFactory:
    """Tune's resources callback: the sample's placement group, or one small bundle for a sample that is invalid."""
    try:
        cfg, _ = trial_config(sweep, {key: config[key] for key in sweep.search}, check_paths=False)
    except ConfigError:
        return tune.PlacementGroupFactory([REJECTED_BUNDLE])
    return trial_resources(cfg, sweep.head_cpus, gpus)


def copy_run(src: Path, dst: Path) -> None:
    """Copy a run directory, keeping only the newest checkpoint of each checkpoints/ folder."""
    for root, dirs, files in os.walk(src):
        here = Path(root)
        target = dst / here.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        if here.name == "checkpoints":
            files = [p.name for p in list_checkpoints(here)[:1]]
        for name in files:
            if name.startswith("."):
                continue  # temp files of writes in flight
            try:
                shutil.copy2(here / name, target / name)
            except FileNotFoundError:
                continue  # pruned while we copied: an older checkpoint; a newer one is already there


class Reporter:
    """Reports a trial's validations to Tune, each with a checkpoint of its run directory."""

    def __init__(self, run: Path, total_steps: int, resumed_from: int):
        self.run, self.total, self.resumed_from = run, total_steps, resumed_from

    def validated(self, step: int, acc: float, best: float | None) -> None:
        if step >= self.total:
            return  # the final report carries the finished artifact
        self.report({RUNG_METRIC: best if best is not None else acc, "val_acc_last": acc, TIME_ATTR: step})

    def report(self, metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="raydistill-report-") as tmp:
            copy_run(self.run, Path(tmp))
            tune.report({**metrics, TOTAL_ATTR: self.total, "resumed_from": self.resumed_from},
                        checkpoint=tune.Checkpoint.from_directory(tmp))


def restore_run(run: Path) -> bool:
    """Rebuild the trial's run directory from Tune's latest checkpoint; False when there is none (a fresh start)."""
    if run.exists():
        shutil.rmtree(run)  # a scratch copy of an earlier attempt: the checkpoint is the truth
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as folder:
        shutil.copytree(folder, run)
    return True


def steps_done(run: Path, cfg: DistillConfig) -> int:
    """Meta-steps a restored run directory already holds: finished stages plus the newest checkpoint."""

    def newest(folder: Path) -> int:
        found = list_checkpoints(folder / CHECKPOINTS)
        return checkpoint_step(found[0]) if found else 0

    if not cfg.boost.stages:
        return newest(run)
    done = 0
    for index, stage in enumerate(cfg.boost.stages):
        folder = stage_dir(run, index)
        if (folder / ARTIFACT).exists():
            done += stage.steps
        else:
            return done + newest(folder)
    return done


def budget_accuracies(run: Path, cfg: DistillConfig, budgets: list[int], placement) -> dict[str, float]:
    """Validation accuracy of every nested prefix, computed in the trial's worker bundles (idle by now)."""
    dset = read_distilled(run / ARTIFACT)
    task = ray.remote(validate_snapshot)
    refs = []
    for i, k in enumerate(budgets):
        part = dset.prefix(k)
        snapshot = {"images": part.images.numpy(), "hard_labels": part.labels.numpy(),
                    "soft_labels": None if part.soft_labels is None else part.soft_labels.numpy()}
        refs.append(task.options(max_retries=3, **placement.options(i % len(placement.bundles))).remote(
            dataclasses.replace(cfg, ipc=k), snapshot))
    accs = {f"val_acc@{k}": float(a) for k, a in zip(budgets, ray.get(refs))}
    accs["val_acc_mean"] = float(np.mean(list(accs.values())))
    return accs


QUIET_LOGGERS = RAY_TRAIN_STORAGE_LOGGERS  # Ray Train's storage modules (raydistill.compat)


def run_trial(config: dict, sweep: dict, worker_cls: type | None = None) -> None:
    """The Tune trainable: one distillation or boosting run in this trial's placement group.

    `config` holds the sample (dotted key -> value), `sweep` the checked sweep file (as a dict, so it pickles).
    """
    for name in QUIET_LOGGERS:  # Tune's checkpoint notices: one per report, in every trial's output
        logging.getLogger(name).setLevel(logging.WARNING)
    spec = Sweep(**sweep)
    try:
        cfg, budgets = checked_config(spec, {key: config[key] for key in spec.search})
    except ConfigError as exc:
        # Returning (not raising) keeps the trial out of Tune's error count and max_failures retries.
        tune.report({RUNG_METRIC: WORST_SCORE, spec.metric: WORST_SCORE, TIME_ATTR: 0, REJECTED: str(exc)})
        return
    cfg.trackers = []  # the sweep's Tune callbacks log this trial; its run would log it twice
    run = Path.cwd() / RUN
    resume = restore_run(run)
    placement = TrialPlacement(ray.util.get_current_placement_group(), first=0 if spec.head_cpus <= 0 else 1,
                               workers=cfg.ray.workers)
    total = total_steps(cfg)
    reporter = Reporter(run, total, steps_done(run, cfg) if resume else 0)
    engine = {"hooks": Hooks(worker_cls=worker_cls or GradientWorker, placement=placement,
                             on_validation=reporter.validated, fit="off")}  # checked with the sample's other checks
    began = time.perf_counter()
    if cfg.boost.stages:
        boost(None if resume else cfg, run, resume=resume, progress=False, evaluate=False, **engine)
        final = budget_accuracies(run, cfg, budgets, placement)
        final[RUNG_METRIC] = final[f"val_acc@{max(budgets)}"]
    else:
        distill(None if resume else cfg, run, resume=resume, progress=False, evaluate=False, **engine)
        meta = read_distilled(run / ARTIFACT).metadata
        final = {RUNG_METRIC: meta["val_acc"], "selected_step": meta["selected_step"]}
    reporter.report({**final, TIME_ATTR: total, "seconds": round(time.perf_counter() - began, 1)})
