"""The experiment: build Tune's Tuner from a sweep, run or resume it, and refuse what cannot work.

Before anything starts: the corners of the search space must hold a valid sample, the largest of them must fit the
cluster (Tune would otherwise wait for it forever), a new sweep must not land in an existing experiment, and a
resumed one must come from the same sweep file (kept in the experiment folder as sweep.yaml).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import stat
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from raydistill.config import ConfigError, DistillConfig
from raydistill.engine.cluster import worker_resources
from raydistill.runtime import connect
from raydistill.storage.atomic import atomic_write_bytes
from raydistill.storage.store import RunPath, location
from raydistill.tune.report import params_text, write_outputs
from raydistill.tune.space import corners, describe_space, make_searcher, planned_trials, search_space
from raydistill.tune.sweep import RUNG_METRIC, TIME_ATTR, Sweep, load_sweep, total_steps
from raydistill.tune.trial import run_trial, sample_resources
from raydistill.watch.trackers import check_usable, merged
from raydistill.watch.tune_trackers import make_callbacks

SWEEP_RECORD = "sweep.yaml"  # in the experiment folder: the sweep file the experiment was started from


class Interrupted(RuntimeError):
    """The sweep was interrupted; `raydistill tune FILE --resume` continues it."""


def check_trusted_storage(sweep: Sweep) -> None:
    """Refuse to resume from a local experiment folder that others can write to.

    Tune.restore unpickles the experiment state, so whoever can write that folder can run code as this user. The
    folder and every folder above it must be writable by their owner only (a sticky folder such as /tmp is fine:
    others cannot replace what is in it). A file:// URI is that local folder; any other URI's access is the
    storage's own (bucket policies); see the README.
    """
    folder = location(sweep.experiment_path())
    if not isinstance(folder, Path):
        return
    for path in [folder, *folder.parents]:
        if not path.exists():
            continue
        mode = path.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            raise ConfigError(f"--resume: {path} is writable by other users, and resuming unpickles the experiment "
                              f"state found under it; make it private (chmod go-w {path}) or resume elsewhere")


def run_sweep(path: str | os.PathLike, *, resume: bool = False, out: str | os.PathLike | None = None,
              address: str | None = None, worker_cls: type | None = None, verbose: int = 1) -> dict:
    """Run (or continue) a sweep; returns the summary rows, best trial and output paths (see report.write_outputs)."""
    sweep = load_sweep(path)
    samples = corners(sweep)
    print(f"sweep {sweep.name}: {planned_trials(sweep)} trials ({describe_search(sweep)}; "
          f"{describe_scheduler(sweep)}; ranked on {sweep.metric})")
    for line in describe_space(sweep):
        print(f"  {line}")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # reports checkpoint
    started = connect(address)
    try:
        exists = experiment_exists(sweep)
        if resume and not exists:
            raise ConfigError(f"--resume: no experiment at {sweep.experiment_path()}; run without --resume to start it")
        if not resume and exists:
            raise ConfigError(f"name: an experiment already exists at {sweep.experiment_path()}; continue it with "
                              f"--resume, or change name/storage in {sweep.source}")
        if resume:
            check_trusted_storage(sweep)
            check_same_sweep(sweep)
        tuner = build_tuner(sweep, samples, resume, worker_cls, verbose)
        if not resume:
            record_sweep(sweep)
        grid = tuner.fit()
        if unfinished(sweep):  # fit() returns early on Ctrl-C / SIGINT
            raise Interrupted(f"sweep interrupted; continue it with: raydistill tune {sweep.source} --resume")
    finally:
        if started:
            ray.shutdown()
    return write_outputs(sweep, grid, out)


def build_tuner(sweep: Sweep, samples: list[tuple[dict, DistillConfig]], resume: bool,
                worker_cls: type | None = None, verbose: int = 1) -> tune.Tuner:
    """The Tuner of a new experiment, or the restored one; `samples` are the valid corners of the space."""
    gpus = check_fits(samples, sweep.head_cpus)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=dataclasses.asdict(sweep), worker_cls=worker_cls),
        resources=functools.partial(sample_resources, sweep=sweep, gpus=gpus),
    )
    if resume:
        return tune.Tuner.restore(sweep.experiment_path(), trainable=trainable, resume_errored=True)
    trackers = merged(samples[0][1].trackers, sweep.trackers)  # the base config's, and the sweep file's
    check_usable(trackers)
    name = functools.partial(trial_name, first=0 if sweep.searcher == "basic" else 1)
    return tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(sweep),
            scheduler=make_scheduler(sweep, max(total_steps(cfg) for _, cfg in samples)),
            num_samples=sweep.num_samples,
            trial_name_creator=name,
            trial_dirname_creator=name,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=sweep.storage_uri(),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=make_callbacks(trackers, sweep.name),
            verbose=verbose,
        ),
    )


def trial_name(trial, first: int) -> str:
    """t000, t001, ... in the order the searcher proposed them (Tune's experiment tag starts with that counter)."""
    return f"t{int(trial.experiment_tag.split('_')[0]) - first:03d}"


def make_scheduler(sweep: Sweep, max_t: int):
    """ASHA on val_acc with meta-steps as time (max_t: the longest trial's steps), or FIFO."""
    s = sweep.scheduler
    if s["name"] == "fifo":
        return FIFOScheduler()
    grace = s["grace_period"] or max(1, max_t // 4)
    return ASHAScheduler(time_attr=TIME_ATTR, metric=RUNG_METRIC, mode="max", max_t=max_t, grace_period=grace,
                         reduction_factor=s["reduction_factor"])


def check_fits(samples: list[tuple[dict, DistillConfig]], head_cpus: float) -> bool:
    """Fail now when a sample can never be placed on this cluster; True when the cluster has GPUs."""
    total_cpus = ray.cluster_resources().get("CPU", 0)
    for params, cfg in samples:
        try:
            bundle = worker_resources(cfg.ray)
            need = head_cpus + cfg.ray.workers * bundle.get("CPU", 0)
            if need > total_cpus + 1e-9:
                raise ConfigError(f"head_cpus: {head_cpus:g} for the trial plus {need - head_cpus:g} for its workers "
                                  f"exceed the cluster's {total_cpus:g} CPUs; lower head_cpus or ray.workers")
        except ConfigError as exc:
            raise ConfigError(f"the sample {params_text(params)}: {exc}") from None
    return ray.cluster_resources().get("GPU", 0) > 0


def experiment_exists(sweep: Sweep) -> bool:
    return tune.Tuner.can_restore(sweep.experiment_path())


def _record(sweep: Sweep) -> RunPath:
    return location(sweep.experiment_path()) / SWEEP_RECORD  # a local folder, file://, s3://, gs://, ...


def record_sweep(sweep: Sweep) -> None:
    """Keep the sweep file in the experiment folder (written atomically), for --resume to compare against."""
    atomic_write_bytes(_record(sweep), Path(sweep.source).read_bytes())


def check_same_sweep(sweep: Sweep) -> None:
    """--resume continues the experiment's own search: refuse when the sweep file now says something else.

    The files are compared as YAML data, so comments and layout may change; a changed value may not (Tune's searcher
    state and the finished trials belong to the old search space).
    """
    path = _record(sweep)
    if not path.exists():  # its trials would not match this trainable
        raise ConfigError(f"--resume: the experiment has no {SWEEP_RECORD} (an older raydistill started it); start a "
                          f"new sweep under another name")
    recorded = yaml.safe_load(path.read_text())
    if yaml.safe_load(Path(sweep.source).read_text()) != recorded:
        raise ConfigError(f"--resume: {sweep.source} changed since the experiment started (its copy: {path}); "
                          f"restore the file, or start a new sweep under another name")


def unfinished(sweep: Sweep) -> bool:
    """Whether the saved experiment still lacks trials or has some that did not end (fit() returned early)."""
    trials = ExperimentAnalysis(sweep.experiment_path()).trials
    ended = all(t.status in ("TERMINATED", "ERROR") for t in trials)
    return not ended or len(trials) < planned_trials(sweep)


def describe_search(sweep: Sweep) -> str:
    if sweep.searcher == "optuna":
        return f"Optuna TPE, seed {sweep.seed}"
    return f"Tune's grid and random search, {sweep.num_samples} per grid point, seed {sweep.seed}"


def describe_scheduler(sweep: Sweep) -> str:
    s = sweep.scheduler
    if s["name"] == "fifo":
        return "FIFO: every trial runs to the end"
    return f"ASHA on val_acc, time = meta-steps, reduction factor {s['reduction_factor']:g}"
