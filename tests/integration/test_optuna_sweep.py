"""An Optuna + ASHA sweep on Ray, end to end: the sweep's seed reaches Tune's run and a rejected sample is scored
worst (the searchers without Ray: tests/unit/test_tune_search.py)."""

import pickle
from pathlib import Path

import pytest
import yaml

from helpers import needs_fashion, needs_optuna, optuna_samples, write_sweep
from raydistill.tune import WORST_SCORE, load_sweep, run_sweep

# The brief's tiny run: a few seconds per trial on one core.
TINIER = {"steps": 6, "ipc": 1, "model.width": 8, "ratbptt.unroll": 4, "ratbptt.window": 2, "ratbptt.real_batch": 64,
          "eval.every": 3, "eval.val_models": 1, "eval.val_steps": 5, "data.val_size": 200, "ray.checkpoint_every": 3,
          "ray.workers": 1, "ray.cpus_per_worker": 1, "ray.worker_threads": 1, "threads": 1}


@pytest.mark.slow
@needs_fashion
@needs_optuna
def test_an_optuna_sweep_with_asha_runs_end_to_end_and_scores_a_rejected_sample_worst(ray_session, tmp_path):
    path = write_sweep(tmp_path, name="optuna", set=TINIER, searcher={"name": "optuna"}, num_samples=3, seed=1,
                       search={"meta.lr": {"loguniform": [1e-3, 1e-1]}, "ratbptt.window": {"choice": [2, 8]}},
                       scheduler={"name": "asha", "grace_period": 3, "reduction_factor": 2})
    sweep = load_sweep(path)
    proposed = optuna_samples(sweep, 3)  # TPE's first proposals are its seeded random start-up draws
    assert [p["ratbptt.window"] for p in proposed] == [2, 2, 8]  # seed 1: the third is invalid (window > unroll 4)
    summary = run_sweep(path, verbose=0)
    rows = sorted(summary["rows"], key=lambda r: r["trial"])
    assert [r["trial"] for r in rows] == ["t000", "t001", "t002"]
    assert [{k: r[k] for k in proposed[0]} for r in rows] == proposed  # the sweep's seed reached Tune's run
    assert rows[0]["status"] == "done" and rows[1]["status"] in ("done", "stopped") and rows[2]["status"] == "rejected"
    experiment = Path(sweep.experiment_path())
    with open(next(experiment.glob("searcher-state-*.pkl")), "rb") as fh:
        study = pickle.load(fh)["_ot_study"]  # what Optuna was told, as Tune saved it
    told = [(t.params["ratbptt.window"], t.value) for t in study.trials]
    assert told[2] == (8, WORST_SCORE) and all(value > WORST_SCORE for _, value in told[:2])
    best = yaml.safe_load(Path(summary["best_preset"]).read_text())
    assert best["meta"]["lr"] == pytest.approx(summary["best"]["meta.lr"]) and best["steps"] == 6
    assert (experiment / "sweep.yaml").read_text() == path.read_text()
