"""The sweep file: its keys, their checks, and the full config of one sample of its search space.

A sweep file (tune_configs/*.yaml) names a base preset, fixed overrides (`set`) and a search space over config fields
(`ratbptt.window`, `meta.lr`, ...) and boosting schedules (`boost.block`, `boost.blocks`, `boost.beta`,
`boost.steps_per_block`). Every problem with the file is a ConfigError naming the key, raised before Ray starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from raydistill.config import ConfigError, DistillConfig
from raydistill.config.checks import parse_trackers
from raydistill.config.loading import load_yaml, read_preset, set_dotted
from raydistill.methods.registry import allow_import_path
from raydistill.setup import config_from_dict
from raydistill.storage.store import check_scheme
from raydistill.synset.blocks import cumulative_budgets, schedule
from raydistill.watch.trackers import check_usable

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
BOOST_KNOBS = ("block", "blocks", "beta", "steps_per_block")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("basic", "optuna")  # basic: Tune's grid + seeded random draws; optuna: Tune's OptunaSearch (TPE)
TIME_ATTR = "step"  # ASHA's clock: meta-steps
RUNG_METRIC = "val_acc"  # what every report carries (ASHA compares trials on it)
TOTAL_ATTR = "total_steps"  # every report of a trial that runs: its meta-steps in all (reached: done)
REJECTED = "rejected"  # the report key of a rejected sample: the validator's reason
SWEEP_KEYS = ("name", "base", "set", "search", "searcher", "num_samples", "seed", "metric", "scheduler",
              "max_concurrent_trials", "head_cpus", "max_failures", "storage", "boost", "trackers")


@dataclasses.dataclass
class Sweep:
    """A checked sweep file. `search` maps dotted config keys to (kind, args), e.g. ("grid", [10, 20])."""

    name: str
    base: str
    fixed: dict[str, Any]
    search: dict[str, tuple[str, list]]
    searcher: str = "basic"
    num_samples: int = 1
    seed: int = 0
    metric: str = RUNG_METRIC
    scheduler: dict = dataclasses.field(default_factory=lambda: {"name": "asha"})
    max_concurrent_trials: int | None = None
    head_cpus: float = 0.0
    max_failures: int = 2
    storage: str = "runs/tune"
    boost: dict | None = None  # {block, blocks, beta, steps_per_block, budgets}: every trial is a Boost-DD run
    trackers: list[dict] = dataclasses.field(default_factory=list)  # Tune logger callbacks (raydistill.watch.tune_trackers)
    source: str = ""

    @property
    def boosting(self) -> bool:
        return self.boost is not None or any(k.startswith("boost.") for k in self.search)

    def storage_uri(self) -> str:
        return self.storage if "://" in self.storage else str(Path(self.storage).expanduser().resolve())

    def experiment_path(self) -> str:
        return f"{self.storage_uri().rstrip('/')}/{self.name}"


def total_steps(cfg: DistillConfig) -> int:
    """Meta-steps of the whole run: every boosting stage's, or the plain run's."""
    return sum(s.steps for s in cfg.boost.stages) if cfg.boost.stages else cfg.steps


def _err(where: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}")


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file; every problem is a ConfigError naming the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tune: {path} is not a file; pass a sweep YAML such as tune_configs/fmnist-window-unroll.yaml")
    raw = load_yaml(path.read_text(), str(path))
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
    sweep.searcher = _parse_searcher(raw.get("searcher", "basic"), search)
    sweep.num_samples = _int(raw.get("num_samples", 1), "num_samples", 1)
    sweep.seed = _int(raw.get("seed", 0), "seed", 0)
    sweep.max_failures = _int(raw.get("max_failures", 2), "max_failures", 0)
    if raw.get("max_concurrent_trials") is not None:
        sweep.max_concurrent_trials = _int(raw["max_concurrent_trials"], "max_concurrent_trials", 1)
    sweep.head_cpus = _number(raw.get("head_cpus", 0.0), "head_cpus", 0.0)
    sweep.storage = str(raw.get("storage", sweep.storage))
    check_scheme(sweep.storage, "storage")  # Tune opens it; a scheme nothing knows is refused before Ray starts
    if "://" not in sweep.storage and not os.path.isabs(os.path.expanduser(sweep.storage)):
        sweep.storage = str(Path.cwd() / sweep.storage)
    sweep.scheduler = _parse_scheduler(raw.get("scheduler", {"name": "asha"}))
    if raw.get("boost") is not None:
        sweep.boost = _parse_boost(raw["boost"])
    sweep.metric = str(raw.get("metric", RUNG_METRIC))
    sweep.trackers = parse_trackers(raw.get("trackers"))
    check_usable(sweep.trackers)
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


def _parse_searcher(raw: Any, search: dict[str, tuple[str, list]]) -> str:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or set(raw) != {"name"} or raw["name"] not in SEARCHERS:
        raise _err("searcher", f"expected {{name: {'|'.join(SEARCHERS)}}}, got {raw!r}")
    if raw["name"] == "optuna":
        grids = [key for key, (kind, _) in search.items() if kind == "grid"]
        if grids:  # Tune's OptunaSearch cannot convert grid_search
            raise _err(f"search.{grids[0]}", "optuna cannot search a grid; use {choice: [...]} or searcher basic")
        if importlib.util.find_spec("optuna") is None:
            raise _err("searcher", "optuna is not installed; pip install 'raydistill[optuna]' (or use searcher basic)")
    return raw["name"]


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


# ---------------------------------------------------------------------------------------------- one sample


def trial_config(sweep: Sweep, params: dict[str, Any], check_paths: bool = True) -> tuple[DistillConfig, list[int]]:
    """The full config of one sample (and its budgets, for boosting); ConfigError says why a sample is invalid.

    The sample's dotted keys are applied to the base preset's raw config dict after the sweep's fixed `set`, so any
    config field can be searched. Checks against the data set (batch sizes) are the trial's: see trial.checked_config.
    """
    data, _ = read_preset(sweep.base)
    values = {**sweep.fixed, **params}
    boost = dict(sweep.boost or {})
    for key, value in values.items():
        if key.startswith("boost."):
            boost[key[len("boost."):]] = value
        else:
            set_dotted(data, key, value)
    data.setdefault("ray", {})["address"] = None  # a trial runs inside the sweep's Ray
    allow_import_path(data.get("method"))  # the sweep file (and its base) are the user's: it may name a method
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
