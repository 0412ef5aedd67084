"""Ray Tune sweeps without running one: the sweep file, rejected samples, trial placement (sweeps on Ray, ASHA,
retries and --resume: tests/integration/test_tune_on_ray.py)."""

import dataclasses

import pytest
from helpers import needs_fashion, write_sweep

from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.tune import WORST_SCORE, checked_config, load_sweep, run_trial, trial_config, trial_resources
from raydistill.tune import trial as tune_trial

# ---------------------------------------------------------------------------------------------- the sweep file


@pytest.mark.parametrize("fields, names", [
    ({"colour": "red"}, "colour: unknown sweep key"),
    ({"search": {"ratbptt.window": [2, 3]}}, "search.ratbptt.window: expected one of"),
    ({"search": {"meta.lr": {"loguniform": [0, 0.1]}}}, "search.meta.lr: loguniform needs low > 0"),
    ({"search": {"meta.lr": {"uniform": [0.1, 0.01]}}}, "search.meta.lr: uniform needs low < high"),
    ({"search": {"boost.size": {"grid": [1, 2]}}}, "search.boost.size: unknown boosting knob"),
    ({"metric": "val_acc_mean"}, "metric: 'val_acc_mean': a distillation sweep ranks on val_acc"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler: expected {name: asha|fifo"),
    ({"searcher": {"name": "hyperopt"}}, "searcher: expected {name: basic|optuna}"),
    ({"searcher": "optuna"}, "search.ratbptt.window: optuna cannot search a grid"),
    ({"num_samples": 0}, "num_samples: expected an integer >= 1"),
    ({"name": "a/b"}, "name: 'a/b' must be a plain folder name"),
])
def test_a_bad_sweep_file_is_one_line_naming_the_key(tmp_path, capsys, fields, names):
    fields.setdefault("search", {"ratbptt.window": {"grid": [2]}})
    path = write_sweep(tmp_path, **fields)
    with pytest.raises(ConfigError, match="^" + names.replace("(", r"\(").replace("{", r"\{").replace("|", r"\|")):
        load_sweep(path)
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydistill: error: ") and "\n" not in err
    assert not (tmp_path / "store").exists()  # nothing is created for a bad file


def test_a_search_space_without_a_single_valid_corner_is_refused_before_ray_starts(tmp_path, capsys):
    path = write_sweep(tmp_path, search={"ratbptt.window": {"grid": [8, 9]}})  # every window > unroll 4
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search: every corner of the search space is invalid, e.g. {'ratbptt.window': 9}: ratbptt.window" in err
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------------------------- rejected samples


@needs_fashion
def test_invalid_samples_are_rejected_with_the_validators_reason(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, search={"ratbptt.window": {"grid": [2, 8]},
                                                      "ratbptt.real_batch": {"grid": [64, 10**6]}}))
    cfg, _ = checked_config(sweep, {"ratbptt.window": 2, "ratbptt.real_batch": 64})
    assert cfg.steps == 6
    with pytest.raises(ConfigError, match="^ratbptt.real_batch: 1000000 is larger than the training split"):
        checked_config(sweep, {"ratbptt.window": 2, "ratbptt.real_batch": 10**6})
    with pytest.raises(ConfigError, match="^ratbptt.window: window 8 > unroll 4"):
        checked_config(sweep, {"ratbptt.window": 8, "ratbptt.real_batch": 64})


def test_a_boosting_sample_with_a_budget_above_its_ipc_is_rejected(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, boost={"beta": 0.1, "steps_per_block": 2, "budgets": [1, 3]},
                                   metric="val_acc_mean",
                                   search={"boost.block": {"grid": [1]}, "boost.blocks": {"grid": [2, 3]}}))
    with pytest.raises(ConfigError, match=r"^boost.budgets: budget 3 > the schedule's IPC 2 \(2 blocks of 1\)"):
        trial_config(sweep, {"boost.block": 1, "boost.blocks": 2}, check_paths=False)
    cfg, budgets = trial_config(sweep, {"boost.block": 1, "boost.blocks": 3}, check_paths=False)
    assert [s.block for s in cfg.boost.stages] == [1, 1, 1] and budgets == [1, 3]
    assert sum(s.steps for s in cfg.boost.stages) == 6


def test_a_rejected_sample_reports_the_worst_score_once_and_starts_nothing(tmp_path, monkeypatch):
    sweep = load_sweep(write_sweep(tmp_path, search={"ratbptt.window": {"grid": [2, 8]}}))
    reports = []

    def started(*args, **kwargs):
        raise AssertionError("a rejected sample must not start anything")

    monkeypatch.setattr(tune_trial.tune, "report", lambda metrics, **kw: reports.append((metrics, kw)))
    for name in ("restore_run", "TrialPlacement", "distill", "boost"):
        monkeypatch.setattr(tune_trial, name, started)
    run_trial({"ratbptt.window": 8}, dataclasses.asdict(sweep))
    ((metrics, extra),) = reports
    assert metrics["val_acc"] == WORST_SCORE == 0.0 and metrics["step"] == 0 and not extra  # no checkpoint
    assert metrics["rejected"].startswith("ratbptt.window: window 8 > unroll 4")


# ---------------------------------------------------------------------------------------------- placement


def test_a_trial_asks_for_exactly_the_workers_it_starts(tmp_path):
    cfg = load_config("quickstart", ["ray.workers=3", "ray.cpus_per_worker=2"], check_paths=False)
    empty_head = trial_resources(cfg, 0, gpus=False)
    assert empty_head.head_bundle_is_empty and empty_head.bundles == [{"CPU": 2.0}] * 3
    with_head = trial_resources(cfg, 1, gpus=True)
    assert with_head.bundles == [{"CPU": 1.0}] + [{"GPU": 1.0, "CPU": 1.0}] * 3
    sweep = load_sweep(write_sweep(tmp_path, search={"ratbptt.window": {"grid": [2, 8]}}))
    rejected = tune_trial.sample_resources({"ratbptt.window": 8}, sweep, gpus=False)
    assert rejected.bundles == [tune_trial.REJECTED_BUNDLE]  # an invalid sample still gets a (small) group
