"""Tune's own search: the sweep's space as Tune domains, seeded searchers (basic and Optuna); an Optuna + ASHA sweep
on Ray is tests/integration/test_optuna_sweep.py."""

import dataclasses
from pathlib import Path

import pytest
from ray.tune.experiment import Experiment
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

from helpers import REPO, needs_optuna, optuna_samples, write_sweep
from raydistill.config import ConfigError
from raydistill.tune import corners, load_sweep, make_searcher, search_space, trial_config
from raydistill.tune import sweep as sweep_file

MIXED = {"ratbptt.window": {"grid": [1, 2]}, "meta.lr": {"loguniform": [1e-4, 1e-1]},
         "ratbptt.inner_lr": {"uniform": [0.001, 0.01]}, "ratbptt.unroll": {"randint": [4, 9]},
         "init.mode": {"choice": ["real", "noise"]}}
RANDOM = {key: space for key, space in MIXED.items() if "grid" not in space}


def basic_samples(sweep, folder: Path) -> list[dict]:
    """What the basic searcher proposes for `sweep`, in order, without running anything (Tune's files in folder)."""
    searcher = make_searcher(dataclasses.replace(sweep, max_concurrent_trials=None))  # all at once: none run
    searcher.add_configurations([Experiment(sweep.name, run=lambda config: None, config=search_space(sweep),
                                            num_samples=sweep.num_samples, storage_path=str(folder))])
    samples = []
    while (trial := searcher.next_trial()) is not None:
        samples.append(trial.config)
    return samples


def test_each_kind_of_the_sweep_file_becomes_the_matching_tune_domain(tmp_path):
    space = search_space(load_sweep(write_sweep(tmp_path, search=MIXED)))
    assert space["ratbptt.window"] == {"grid_search": [1, 2]}
    lr, inner, unroll, init = space["meta.lr"], space["ratbptt.inner_lr"], space["ratbptt.unroll"], space["init.mode"]
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform) and (lr.lower, lr.upper) == (1e-4, 1e-1)
    assert isinstance(inner, Float) and isinstance(inner.get_sampler(), Uniform) and inner.upper == 0.01
    assert isinstance(unroll, Integer) and (unroll.lower, unroll.upper) == (4, 9)  # high exclusive, as in the file
    assert isinstance(init, Categorical) and init.categories == ["real", "noise"]


def test_the_basic_search_covers_the_grid_and_draws_the_rest_reproducibly(tmp_path):
    path = write_sweep(tmp_path, num_samples=3, seed=7, search=MIXED)
    samples = basic_samples(load_sweep(path), tmp_path)
    assert len(samples) == 6 and sorted(s["ratbptt.window"] for s in samples) == [1, 1, 1, 2, 2, 2]
    assert samples == basic_samples(load_sweep(path), tmp_path)  # the seed fixes every draw
    assert samples != basic_samples(load_sweep(write_sweep(tmp_path, num_samples=3, seed=8, search=MIXED)), tmp_path)
    assert all(1e-4 <= s["meta.lr"] <= 1e-1 and 0.001 <= s["ratbptt.inner_lr"] <= 0.01 for s in samples)
    assert all(4 <= s["ratbptt.unroll"] < 9 and s["init.mode"] in ("real", "noise") for s in samples)
    assert len({s["meta.lr"] for s in samples}) == 6


@needs_optuna
def test_the_optuna_search_is_seeded_by_the_sweep(tmp_path):
    path = write_sweep(tmp_path, searcher={"name": "optuna"}, num_samples=5, seed=3, search=RANDOM)
    samples = optuna_samples(load_sweep(path), 5)
    assert samples == optuna_samples(load_sweep(path), 5)
    other = load_sweep(write_sweep(tmp_path, name="other", searcher="optuna", num_samples=5, seed=4, search=RANDOM))
    assert samples != optuna_samples(other, 5)
    assert all(set(s) == set(RANDOM) and 4 <= s["ratbptt.unroll"] < 9 for s in samples)


@needs_optuna
def test_optuna_learns_a_boosting_trials_final_score_and_ignores_its_partial_reports(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, searcher="optuna", metric="val_acc_mean", boost={"block": 1, "blocks": 2},
                                   search={"boost.beta": {"uniform": [0.0, 0.5]}}))
    searcher = make_searcher(dataclasses.replace(sweep, max_concurrent_trials=None))
    assert searcher.metric is None  # Tune must not demand val_acc_mean in every report
    searcher.set_search_properties(None, None, search_space(sweep))
    searcher.suggest("a")
    searcher.on_trial_result("a", {"val_acc": 40.0, "step": 2})  # no val_acc_mean yet: nothing to learn
    searcher.on_trial_complete("a", {"val_acc": 41.0, "val_acc_mean": 42.5, "step": 8})
    (told,) = searcher.searcher._ot_study.trials
    assert told.value == 42.5 and told.intermediate_values == {}


def test_an_optuna_sweep_without_optuna_installed_says_how_to_get_it(tmp_path, monkeypatch):
    path = write_sweep(tmp_path, searcher="optuna", search=RANDOM)
    monkeypatch.setattr(sweep_file.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"^searcher: optuna is not installed; pip install 'raydistill\[optuna\]'"):
        load_sweep(path)


def test_the_corners_hold_the_largest_valid_sample(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, search={"ray.workers": {"randint": [1, 4]},
                                                     "ratbptt.window": {"grid": [2, 8]}, "steps": {"choice": [6, 9]}}))
    found = corners(sweep)
    assert all(params["ratbptt.window"] == 2 for params, _ in found)  # window 8 > unroll 4: never a corner
    assert max(cfg.ray.workers for _, cfg in found) == 3 and max(cfg.steps for _, cfg in found) == 9


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "tune_configs").glob("*.yaml")))
def test_every_shipped_sweep_builds_only_valid_trials_or_says_why(name, tmp_path):
    sweep = load_sweep(REPO / "tune_configs" / name)
    built, reasons = 0, []
    for params in basic_samples(sweep, tmp_path):
        try:
            trial_config(sweep, params, check_paths=False)
            built += 1
        except ConfigError as exc:
            reasons.append(str(exc))
    assert built >= 6
    assert all(r.startswith("ratbptt.window: window") for r in reasons)  # only W > T is ever rejected
