"""Ray Tune sweeps: each trial is one distillation (or Boost-DD) run with its own parameter server and workers.

A sweep file (tune_configs/*.yaml) names a base preset, fixed overrides and a search space over config fields
(`ratbptt.window`, `meta.lr`, ...) and boosting schedules (`boost.block`, `boost.blocks`, `boost.beta`,
`boost.steps_per_block`). The driver draws every sample up front with the sweep's seed and checks each with the
config validator: an invalid sample (window > unroll, a budget above the set's IPC) is listed with the reason and
never started. The valid ones become Tune trials:

- resources: a placement group of an empty head bundle (the trial's driver and parameter server, `head_cpus`) plus
  one bundle per worker, sized from the trial's own config, so the group always matches what the trial starts;
- reports: validation accuracy every `eval.every` meta-steps with a checkpoint of the run directory; `val_acc` is
  the accuracy of the set the run would return now (its best validated snapshot), `step` counts meta-steps;
- scheduling: ASHA on `val_acc` with meta-steps as time (or FIFO); a failed trial restarts from its last checkpoint
  (up to `max_failures` times); an interrupted sweep continues with `raydistill tune FILE --resume`.

Outputs in the sweep's output folder: results.csv, best.yaml (a preset `raydistill distill --preset` accepts) and
plot.png (the metric against each swept parameter).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raydistill.config.core import ConfigError, DistillConfig, _read_yaml, config_from_dict, config_to_dict, validate_against_data

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
BOOST_KNOBS = ("block", "blocks", "beta", "steps_per_block")
SCHEDULERS = ("asha", "fifo")
TIME_ATTR = "step"  # ASHA's clock: meta-steps
RUNG_METRIC = "val_acc"  # what every report carries (ASHA compares trials on it)
SWEEP_KEYS = ("name", "base", "set", "search", "num_samples", "seed", "metric", "scheduler", "max_concurrent_trials",
              "head_cpus", "max_failures", "storage", "boost")
RUN = "run"  # the trial's run directory, inside the trial's working directory
PLAN = "trials.json"  # in the output folder: trial id -> sampled parameters


@dataclasses.dataclass
class Sweep:
    name: str
    base: str
    fixed: dict[str, Any]
    search: dict[str, tuple[str, list]]
    num_samples: int = 1
    seed: int = 0
    metric: str = RUNG_METRIC
    scheduler: dict = dataclasses.field(default_factory=lambda: {"name": "asha"})
    max_concurrent_trials: int | None = None
    head_cpus: float = 0.0
    max_failures: int = 2
    storage: str = "runs/tune"
    boost: dict | None = None  # {block, blocks, beta, steps_per_block, budgets}: every trial is a Boost-DD run
    source: str = ""

    @property
    def boosting(self) -> bool:
        return self.boost is not None or any(k.startswith("boost.") for k in self.search)

    def storage_uri(self) -> str:
        return self.storage if "://" in self.storage else str(Path(self.storage).expanduser().resolve())

    def experiment_path(self) -> str:
        return f"{self.storage_uri().rstrip('/')}/{self.name}"


@dataclasses.dataclass
class Trial:
    id: str
    params: dict[str, Any]
    cfg: DistillConfig | None = None
    budgets: list[int] = dataclasses.field(default_factory=list)
    reason: str | None = None  # why the sample was rejected

    @property
    def total_steps(self) -> int:
        return total_steps(self.cfg)


def total_steps(cfg: DistillConfig) -> int:
    """Meta-steps of the whole run: every boosting stage's, or the plain run's."""
    return sum(s.steps for s in cfg.boost.stages) if cfg.boost.stages else cfg.steps


# ---------------------------------------------------------------------------------------------- the sweep file


def _err(where: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}")


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file; every problem is a ConfigError naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tune: {path} is not a file; pass a sweep YAML such as tune_configs/fmnist-window-unroll.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise _err(unknown[0], f"unknown sweep key in {path}; valid keys: {', '.join(SWEEP_KEYS)}")
    for key in ("name", "base", "search"):
        if key not in raw:
            raise _err(key, f"missing in {path}; every sweep names a base preset, a search space and a name")
    name = str(raw["name"])
    if not name or "/" in name or name.startswith("."):
        raise _err("name", f"{name!r} must be a plain folder name (no '/'), e.g. fmnist-window-unroll")
    base = str(raw["base"])
    if not os.path.isabs(base) and (base.endswith((".yaml", ".yml")) or os.sep in base):
        base = str((path.parent / base).resolve())  # relative to the sweep file
    fixed = raw.get("set") or {}
    if not isinstance(fixed, dict):
        raise _err("set", "expected a mapping of dotted config fields to values, e.g. {steps: 200}")
    if isinstance(fixed.get("data.root"), str) and not os.path.isabs(os.path.expanduser(fixed["data.root"])):
        fixed["data.root"] = str(Path.cwd() / fixed["data.root"])  # trials run in folders of their own
    search = _parse_search(raw["search"])
    sweep = Sweep(name=name, base=base, fixed=fixed, search=search, source=str(path))
    sweep.num_samples = _int(raw.get("num_samples", 1), "num_samples", 1)
    sweep.seed = _int(raw.get("seed", 0), "seed", 0)
    sweep.max_failures = _int(raw.get("max_failures", 2), "max_failures", 0)
    if raw.get("max_concurrent_trials") is not None:
        sweep.max_concurrent_trials = _int(raw["max_concurrent_trials"], "max_concurrent_trials", 1)
    sweep.head_cpus = _number(raw.get("head_cpus", 0.0), "head_cpus", 0.0)
    sweep.storage = str(raw.get("storage", sweep.storage))
    if "://" not in sweep.storage and not os.path.isabs(os.path.expanduser(sweep.storage)):
        sweep.storage = str(Path.cwd() / sweep.storage)
    sweep.scheduler = _parse_scheduler(raw.get("scheduler", {"name": "asha"}))
    if raw.get("boost") is not None:
        sweep.boost = _parse_boost(raw["boost"])
    sweep.metric = str(raw.get("metric", RUNG_METRIC))
    _check_metric(sweep)
    for key in search:
        if key in fixed:
            raise _err(f"set.{key}", "is also in search; keep it in one of the two")
        if key.startswith("boost.") and key[len("boost."):] not in BOOST_KNOBS:
            raise _err(f"search.{key}", f"unknown boosting knob; choose from boost.{', boost.'.join(BOOST_KNOBS)}")
    if sweep.boosting and sweep.boost is None:
        sweep.boost = {}
    return sweep


def _int(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _err(key, f"expected an integer >= {low}, got {value!r}")
    return value


def _number(value: Any, key: str, low: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _err(key, f"expected a number >= {low:g}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number < low:
        raise _err(key, f"expected a number >= {low:g}, got {value!r}")
    return number


def _parse_search(raw: Any) -> dict[str, tuple[str, list]]:
    if not isinstance(raw, dict) or not raw:
        raise _err("search", "expected a mapping of dotted fields to a space, e.g. {ratbptt.window: {grid: [10, 20]}}")
    out = {}
    for key, space in raw.items():
        where = f"search.{key}"
        if not isinstance(space, dict) or len(space) != 1 or next(iter(space)) not in KINDS:
            raise _err(where, f"expected one of {', '.join(f'{{{k}: ...}}' for k in KINDS)}, got {space!r}")
        kind, args = next(iter(space.items()))
        if not isinstance(args, list) or not args:
            raise _err(where, f"{kind} takes a non-empty list, got {args!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(args) != 2:
                raise _err(where, f"{kind} takes [low, high], got {args!r}")
            low, high = (_number(a, where, -math.inf) for a in args)
            if not low < high:
                raise _err(where, f"{kind} needs low < high, got {args!r}")
            if kind == "loguniform" and low <= 0:
                raise _err(where, f"loguniform needs low > 0, got {args!r}")
            if kind == "randint" and not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
                raise _err(where, f"randint takes two integers [low, high), got {args!r}")
            args = [low, high] if kind != "randint" else [int(low), int(high)]
        out[str(key)] = (kind, list(args))
    return out


def _parse_scheduler(raw: Any) -> dict:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or raw.get("name", "asha") not in SCHEDULERS:
        raise _err("scheduler", f"expected {{name: asha|fifo, ...}}, got {raw!r}")
    out = {"name": raw.get("name", "asha")}
    allowed = {"name"} | ({"grace_period", "reduction_factor"} if out["name"] == "asha" else set())
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _err(f"scheduler.{unknown[0]}", f"not a setting of {out['name']}; valid: {', '.join(sorted(allowed))}")
    if out["name"] == "asha":
        out["grace_period"] = None if raw.get("grace_period") is None else _int(raw["grace_period"],
                                                                                  "scheduler.grace_period", 1)
        out["reduction_factor"] = _number(raw.get("reduction_factor", 2), "scheduler.reduction_factor", 1.0)
        if out["reduction_factor"] <= 1:
            raise _err("scheduler.reduction_factor", f"must be > 1, got {out['reduction_factor']:g}")
    return out


def _parse_boost(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise _err("boost", f"expected a mapping of {', '.join(BOOST_KNOBS)}, budgets; got {raw!r}")
    unknown = sorted(set(raw) - set(BOOST_KNOBS) - {"budgets"})
    if unknown:
        raise _err(f"boost.{unknown[0]}", f"unknown; valid: {', '.join(BOOST_KNOBS)}, budgets")
    budgets = raw.get("budgets")
    if budgets is not None and (not isinstance(budgets, list) or not budgets
                                or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in budgets)):
        raise _err("boost.budgets", f"expected a list of positive IPCs, e.g. [1, 2, 5], got {budgets!r}")
    return dict(raw)


def _check_metric(sweep: Sweep) -> None:
    metric = sweep.metric
    if metric == RUNG_METRIC:
        return
    if not sweep.boosting:
        raise _err("metric", f"{metric!r}: a distillation sweep ranks on val_acc; val_acc_mean and val_acc@K are for "
                             "boosting sweeps")
    if metric == "val_acc_mean":
        return
    if metric.startswith("val_acc@") and metric[len("val_acc@"):].isdigit() and int(metric[len("val_acc@"):]) > 0:
        return
    raise _err("metric", f"{metric!r} is not val_acc, val_acc_mean or val_acc@K (K an IPC budget, e.g. val_acc@2)")


# ---------------------------------------------------------------------------------------------- samples -> trials


def draw_samples(sweep: Sweep) -> list[dict[str, Any]]:
    """Every grid point times num_samples draws of the random dimensions, in a fixed order for the sweep's seed."""
    rng = np.random.default_rng(sweep.seed)
    grid_keys = [k for k, (kind, _) in sweep.search.items() if kind == "grid"]
    samples = []
    for point in itertools.product(*(sweep.search[k][1] for k in grid_keys)):
        for _ in range(sweep.num_samples):
            sample = {}
            for key, (kind, args) in sweep.search.items():
                if kind == "grid":
                    sample[key] = point[grid_keys.index(key)]
                elif kind == "choice":
                    sample[key] = args[int(rng.integers(len(args)))]
                elif kind == "uniform":
                    sample[key] = float(rng.uniform(*args))
                elif kind == "loguniform":
                    sample[key] = float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
                else:
                    sample[key] = int(rng.integers(*args))
            samples.append(sample)
    return samples


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise _err(key, f"{part!r} is not a section of the config")
        node = child
    node[parts[-1]] = value


def trial_config(sweep: Sweep, params: dict[str, Any], check_paths: bool = True) -> tuple[DistillConfig, list[int]]:
    """The full config of one sample (and its budgets, for boosting); ConfigError says why a sample is invalid."""
    from raydistill.distributed.boost import cumulative_budgets, schedule

    data, _ = _read_yaml(sweep.base)
    values = {**sweep.fixed, **params}
    boost = dict(sweep.boost or {})
    for key, value in values.items():
        if key.startswith("boost."):
            boost[key[len("boost."):]] = value
        else:
            _set_dotted(data, key, value)
    data.setdefault("ray", {})["address"] = None  # a trial runs inside the sweep's Ray
    cfg = config_from_dict(data, check_paths=check_paths)
    if not sweep.boosting:
        if cfg.boost.stages:
            raise _err("boost.stages", "a distillation sweep's base must not have boost.stages; use a boost: section")
        budgets = []
    else:
        missing = [k for k in BOOST_KNOBS if k not in boost and k != "steps_per_block"]
        if missing:
            raise _err(f"boost.{missing[0]}", "needed by a boosting sweep; set it in boost: or search it")
        for knob in ("block", "blocks", "steps_per_block"):
            if knob in boost:
                _int(boost[knob], f"boost.{knob}", 1)
        stages = schedule(boost["block"], boost["blocks"], _number(boost["beta"], "boost.beta", 0.0),
                          boost.get("steps_per_block", cfg.steps))
        data["boost"] = {"stages": [dataclasses.asdict(s) for s in stages]}
        cfg = config_from_dict(data, check_paths=check_paths)  # the schedule is validated like any field
        total = sum(s.block for s in stages)
        budgets = list(boost.get("budgets") or cumulative_budgets(stages))
        over = [k for k in budgets if k > total]
        if over:
            raise _err("boost.budgets", f"budget {over[0]} > the schedule's IPC {total} "
                                        f"({boost['blocks']} blocks of {boost['block']}); lower it or add blocks")
        if sweep.metric.startswith("val_acc@") and int(sweep.metric.split("@")[1]) not in budgets:
            raise _err("metric", f"{sweep.metric}: budget not among this trial's budgets {budgets}; add it to "
                                 "boost.budgets")
    if cfg.eval.every <= 0:
        raise _err("eval.every", "a sweep ranks trials on validation accuracy; set eval.every > 0 (e.g. steps / 4)")
    return cfg, budgets


def plan_trials(sweep: Sweep) -> list[Trial]:
    """Every sample as a Trial: valid (with its config) or rejected (with the one-line reason)."""
    from raydistill.data.registry import load_dataset

    trials, sizes = [], {}
    for index, params in enumerate(draw_samples(sweep)):
        trial = Trial(id=f"t{index:03d}", params=params)
        try:
            trial.cfg, trial.budgets = trial_config(sweep, params)
            key = json.dumps(config_to_dict(trial.cfg.data), sort_keys=True)
            if key not in sizes:  # load each distinct data set once, to check batch sizes against it
                ds = load_dataset(trial.cfg.data)
                sizes[key] = (ds.num_train, ds.num_classes, len(ds.val_y))
            check = trial.cfg
            if check.boost.stages:
                check = dataclasses.replace(check, ipc=sum(s.block for s in check.boost.stages))
            validate_against_data(check, *sizes[key])
        except ConfigError as exc:
            trial.cfg, trial.reason = None, str(exc)
        trials.append(trial)
    return trials


def trial_resources(cfg: DistillConfig, head_cpus: float, gpus: bool):
    """The trial's placement group: the head (trial driver + parameter server) and one bundle per worker."""
    from ray import tune

    from raydistill.distributed.cluster import worker_bundle

    head = {"CPU": head_cpus} if head_cpus > 0 else {}
    return tune.PlacementGroupFactory([head] + [worker_bundle(cfg.ray, gpus) for _ in range(cfg.ray.workers)],
                                      strategy="PACK")


# ---------------------------------------------------------------------------------------------- one trial


def copy_run(src: Path, dst: Path) -> None:
    """Copy a run directory, keeping only the newest checkpoint of each checkpoints/ folder."""
    from raydistill.io.checkpoint import list_checkpoints

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
        from ray import tune

        with tempfile.TemporaryDirectory(prefix="raydistill-report-") as tmp:
            copy_run(self.run, Path(tmp))
            tune.report({**metrics, "resumed_from": self.resumed_from},
                        checkpoint=tune.Checkpoint.from_directory(tmp))


def restore_run(run: Path) -> bool:
    """Rebuild the trial's run directory from Tune's latest checkpoint; False when there is none (a fresh start)."""
    from ray import tune

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
    from raydistill.io.checkpoint import list_checkpoints
    from raydistill.io.run_dir import ARTIFACT

    def newest(folder: Path) -> int:
        found = list_checkpoints(folder / "checkpoints")
        return int(found[0].name[len("ckpt-"):-len(".rdck")]) if found else 0

    if not cfg.boost.stages:
        return newest(run)
    done = 0
    for index, stage in enumerate(cfg.boost.stages):
        folder = run / f"stage-{index + 1}"
        if (folder / ARTIFACT).exists():
            done += stage.steps
        else:
            return done + newest(folder)
    return done


def budget_accuracies(run: Path, cfg: DistillConfig, budgets: list[int], placement) -> dict[str, float]:
    """Validation accuracy of every nested prefix, computed in the trial's worker bundles (idle by now)."""
    import ray

    from raydistill.io.artifact import read_distilled
    from raydistill.io.run_dir import ARTIFACT
    from raydistill.distributed.worker import validate_snapshot

    dset = read_distilled(run / ARTIFACT)
    task = ray.remote(validate_snapshot)
    refs = []
    for i, k in enumerate(budgets):
        part = dset.prefix(k)
        snapshot = {"images": part.images.numpy(), "hard_labels": part.labels.numpy(),
                    "soft_labels": None if part.soft_labels is None else part.soft_labels.numpy()}
        refs.append(task.options(max_retries=3, **placement.options(i % len(placement.bundles))).remote(
            config_to_dict(dataclasses.replace(cfg, ipc=k)), snapshot))
    accs = {f"val_acc@{k}": float(a) for k, a in zip(budgets, ray.get(refs))}
    accs["val_acc_mean"] = float(np.mean(list(accs.values())))
    return accs


def run_trial(config: dict, sweep: dict, plan: dict[str, dict], worker_cls: type | None = None) -> None:
    """The Tune trainable: one distillation or boosting run in this trial's placement group.

    config["trial"] is the trial's id; `plan` maps ids to their sampled parameters.
    """
    import ray

    from raydistill.io.artifact import read_distilled
    from raydistill.distributed.boost import boost_on_ray
    from raydistill.distributed.cluster import TrialPlacement
    from raydistill.distributed.engine import distill_on_ray
    from raydistill.io.run_dir import ARTIFACT
    from raydistill.distributed.worker import MetaGradWorker

    spec = Sweep(**sweep)
    cfg, budgets = trial_config(spec, plan[config["trial"]])
    run = Path.cwd() / RUN
    resume = restore_run(run)
    placement = TrialPlacement(ray.util.get_current_placement_group(), first=0 if spec.head_cpus <= 0 else 1,
                               workers=cfg.ray.workers)
    total = total_steps(cfg)
    reporter = Reporter(run, total, steps_done(run, cfg) if resume else 0)
    engine = {"worker_cls": worker_cls or MetaGradWorker, "placement": placement,
              "on_validation": reporter.validated}
    began = time.perf_counter()
    if cfg.boost.stages:
        boost_on_ray(None if resume else cfg, run, resume=resume, progress=False, evaluate=False, **engine)
        final = budget_accuracies(run, cfg, budgets, placement)
        final[RUNG_METRIC] = final[f"val_acc@{max(budgets)}"]
    else:
        distill_on_ray(None if resume else cfg, run, resume=resume, progress=False, evaluate=False, **engine)
        meta = read_distilled(run / ARTIFACT).metadata
        final = {RUNG_METRIC: meta["val_acc"], "selected_step": meta["selected_step"]}
    reporter.report({**final, TIME_ATTR: total, "seconds": round(time.perf_counter() - began, 1)})


# ---------------------------------------------------------------------------------------------- the experiment


def _scheduler(sweep: Sweep, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    if s["name"] == "fifo":
        return FIFOScheduler()
    grace = s["grace_period"] or max(1, max_t // 4)
    return ASHAScheduler(time_attr=TIME_ATTR, metric=RUNG_METRIC, mode="max", max_t=max_t, grace_period=grace,
                         reduction_factor=s["reduction_factor"])


def _check_fits(trials: list[Trial], head_cpus: float) -> bool:
    """Fail now when a trial can never be placed on this cluster (Tune would wait for it forever)."""
    import ray

    from raydistill.distributed.cluster import worker_resources

    total_cpus = ray.cluster_resources().get("CPU", 0)
    for trial in trials:
        try:
            bundle = worker_resources(trial.cfg.ray)
            need = head_cpus + trial.cfg.ray.workers * bundle.get("CPU", 0)
            if need > total_cpus + 1e-9:
                raise ConfigError(f"head_cpus: {head_cpus:g} for the trial plus {need - head_cpus:g} for its workers "
                                  f"exceed the cluster's {total_cpus:g} CPUs; lower head_cpus or ray.workers")
        except ConfigError as exc:
            raise ConfigError(f"trial {trial.id} {_params_text(trial.params)}: {exc}") from None
    return ray.cluster_resources().get("GPU", 0) > 0


def _params_text(params: dict) -> str:
    return "{" + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) + "}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_tuner(sweep: Sweep, trials: list[Trial], resume: bool, worker_cls: type | None = None, verbose: int = 1):
    from ray import tune

    valid = [t for t in trials if t.cfg is not None]
    gpus = _check_fits(valid, sweep.head_cpus)
    by_id = {t.id: t for t in valid}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=dataclasses.asdict(sweep), plan={t.id: t.params for t in valid},
                             worker_cls=worker_cls),
        resources=lambda config: trial_resources(by_id[config["trial"]].cfg, sweep.head_cpus, gpus),
    )
    if resume:
        return tune.Tuner.restore(sweep.experiment_path(), trainable=trainable, resume_errored=True)
    max_t = max(t.total_steps for t in valid)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.id for t in valid])},  # the parameters travel in `plan`
        tune_config=tune.TuneConfig(
            scheduler=_scheduler(sweep, max_t),
            num_samples=1,
            max_concurrent_trials=sweep.max_concurrent_trials,
            trial_name_creator=lambda t: t.config["trial"],
            trial_dirname_creator=lambda t: t.config["trial"],
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=sweep.storage_uri(),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=verbose,
        ),
    )


def experiment_exists(sweep: Sweep) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(sweep.experiment_path())


def check_plan(path: Path, trials: list[Trial], resume: bool) -> None:
    """Record which parameters each trial id stands for; a resumed sweep must draw the same ones."""
    from raydistill.io.atomic import atomic_write_json

    plan = {t.id: t.params for t in trials}
    if resume and path.exists():
        old = json.loads(path.read_text())
        changed = [i for i in sorted(set(old) | set(plan)) if old.get(i) != plan.get(i)]
        if changed:
            raise ConfigError(f"--resume: the sweep file now draws different samples than when the experiment started "
                              f"(trial {changed[0]} was {old.get(changed[0])}); restore the file, or start a new sweep "
                              f"under another name")
        return
    atomic_write_json(path, plan)


class Interrupted(RuntimeError):
    """The sweep was interrupted; `raydistill tune FILE --resume` continues it."""


def run_sweep(path: str | os.PathLike, *, resume: bool = False, out: str | os.PathLike | None = None,
              address: str | None = None, worker_cls: type | None = None, verbose: int = 1) -> dict:
    """Run (or continue) a sweep; returns the summary rows, best trial and output paths."""
    from raydistill.distributed.cluster import connect

    sweep = load_sweep(path)
    trials = plan_trials(sweep)
    rejected = [t for t in trials if t.cfg is None]
    valid = [t for t in trials if t.cfg is not None]
    print(f"sweep {sweep.name}: {len(trials)} samples, {len(valid)} trials, {len(rejected)} rejected "
          f"({_describe_scheduler(sweep)}; ranked on {sweep.metric})")
    for t in trials:
        print(f"  {t.id} {_params_text(t.params)}" + (f"  rejected: {t.reason}" if t.reason else ""))
    if not valid:
        raise ConfigError("search: every sample was rejected (reasons above); fix the search space")
    folder = output_dir(sweep, out)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # reports checkpoint
    started = connect(address)
    try:
        exists = experiment_exists(sweep)
        if resume and not exists:
            raise ConfigError(f"--resume: no experiment at {sweep.experiment_path()}; run without --resume to start it")
        if not resume and exists:
            raise ConfigError(f"name: an experiment already exists at {sweep.experiment_path()}; continue it with "
                              f"--resume, or change name/storage in {sweep.source}")
        check_plan(folder / PLAN, trials, resume)
        tuner = build_tuner(sweep, trials, resume, worker_cls, verbose)
        grid = tuner.fit()
        if unfinished(sweep, valid):  # fit() returns early on Ctrl-C / SIGINT
            raise Interrupted(f"sweep interrupted; continue it with: raydistill tune {sweep.source} --resume")
    finally:
        if started:
            import ray

            ray.shutdown()
    return write_outputs(sweep, trials, grid, out)


def unfinished(sweep: Sweep, valid: list[Trial]) -> list[str]:
    """Trials the saved experiment state does not show as ended (fit() returned early: Ctrl-C / SIGINT)."""
    from ray.tune import ExperimentAnalysis

    saved = {t.config["trial"]: t.status for t in ExperimentAnalysis(sweep.experiment_path()).trials}
    return [t.id for t in valid if saved.get(t.id) not in ("TERMINATED", "ERROR")]


def _describe_scheduler(sweep: Sweep) -> str:
    s = sweep.scheduler
    if s["name"] == "fifo":
        return "FIFO: every trial runs to the end"
    return f"ASHA on val_acc, time = meta-steps, reduction factor {s['reduction_factor']:g}"


# ---------------------------------------------------------------------------------------------- outputs


def result_rows(sweep: Sweep, trials: list[Trial], grid) -> list[dict]:
    """One row per sample (rejected ones too), sorted by the metric, best first."""
    results = {}
    for result in grid:
        results[result.config["trial"]] = result
    rows = []
    for t in trials:
        row = {"trial": t.id, **{k: t.params[k] for k in sweep.search}}
        if t.cfg is None:
            rows.append({**row, "status": "rejected", sweep.metric: None, "note": t.reason})
            continue
        result = results.get(t.id)
        metrics = (result.metrics or {}) if result is not None else {}
        step = metrics.get(TIME_ATTR)
        value = _round(metrics.get(sweep.metric))
        if result is None:
            status, note = "missing", "not in the experiment"
        elif result.error is not None:
            status, note = "error", str(result.error).strip().splitlines()[-1][:200]
        elif step is not None and step >= t.total_steps:
            status, note = "done", ""
        else:
            status, note = "stopped", f"stopped early by {sweep.scheduler['name'].upper()} at step {step}"
        if status != "done" and sweep.metric != RUNG_METRIC:
            value = None  # budget metrics exist only for finished boosting trials
        checkpoint = result.checkpoint.path if result is not None and result.checkpoint is not None else ""
        rows.append({**row, "status": status, sweep.metric: value, RUNG_METRIC: _round(metrics.get(RUNG_METRIC)),
                     TIME_ATTR: step, "steps": t.total_steps, "resumed_from": metrics.get("resumed_from"),
                     "checkpoint": checkpoint, "note": note})
    order = {"done": 0, "stopped": 1, "error": 2, "missing": 3, "rejected": 4}
    rows.sort(key=lambda r: (r[sweep.metric] is None, -(r[sweep.metric] or 0), order[r["status"]], r["trial"]))
    return rows


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def output_dir(sweep: Sweep, out: str | os.PathLike | None) -> Path:
    if out is not None:
        return Path(out)
    if "://" in sweep.storage:
        return Path("runs") / "tune" / sweep.name
    return Path(sweep.experiment_path())


def write_outputs(sweep: Sweep, trials: list[Trial], grid, out: str | os.PathLike | None = None) -> dict:
    from raydistill.io.atomic import atomic_write_text

    folder = output_dir(sweep, out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = result_rows(sweep, trials, grid)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = folder / ".results.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, folder / "results.csv")
    print(summary_table(sweep, rows))
    summary = {"rows": rows, "results": str(folder / "results.csv"), "best": None, "best_preset": None, "plot": None}
    finished = [r for r in rows if r["status"] == "done" and r[sweep.metric] is not None]
    if finished:
        best = finished[0]
        cfg = next(t.cfg for t in trials if t.id == best["trial"])
        header = (f"# Best trial {best['trial']} of sweep {sweep.name} ({sweep.source}): {sweep.metric} = "
                  f"{best[sweep.metric]:.2f} % on the validation split.\n"
                  f"# Swept: {_params_text({k: best[k] for k in sweep.search})}\n"
                  f"# Use: raydistill {'boost' if cfg.boost.stages else 'distill'} --preset {folder / 'best.yaml'}\n")
        data = config_to_dict(cfg)
        atomic_write_text(folder / "best.yaml", header + yaml.safe_dump(data, sort_keys=False))
        summary.update(best=best, best_preset=str(folder / "best.yaml"))
        print(f"best: {best['trial']} {_params_text({k: best[k] for k in sweep.search})} "
              f"{sweep.metric} {best[sweep.metric]:.2f}")
        print(f"best preset: {folder / 'best.yaml'}  (raydistill {'boost' if cfg.boost.stages else 'distill'} "
              f"--preset {folder / 'best.yaml'})")
    summary["plot"] = plot(sweep, rows, folder / "plot.png")
    print(f"results: {folder / 'results.csv'}" + (f"; plot: {summary['plot']}" if summary["plot"] else ""))
    return summary


def summary_table(sweep: Sweep, rows: list[dict]) -> str:
    keys = list(sweep.search)
    head = ["rank", "trial", *keys, sweep.metric, "steps", "status"]
    lines = [head]
    for rank, r in enumerate(rows, 1):
        value = r[sweep.metric]
        steps = "" if r.get(TIME_ATTR) is None else f"{r[TIME_ATTR]}/{r['steps']}"
        status = r["status"] if r["status"] in ("done",) else f"{r['status']}: {r['note']}"
        lines.append([str(rank), r["trial"], *(_fmt(r[k]) for k in keys),
                      "" if value is None else f"{value:.2f}", steps, status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def plot(sweep: Sweep, rows: list[dict], path: Path) -> str | None:
    """The metric against each swept parameter: filled dots ran to the end, hollow ones were stopped early."""
    try:
        import matplotlib

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
        kind, args = sweep.search[key]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
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
