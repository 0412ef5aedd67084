"""Ray Tune sweeps on Ray: trial placement against the cluster, ASHA, rejected samples, the best config, retries
from a checkpoint and --resume (the sweep file and samples without Ray: tests/unit/test_tune.py)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO, SWEEP_TINY as TINY, needs_fashion, write_sweep
from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.engine.worker import GradientWorker
from raydistill.setup import load_config
from raydistill.tune import run_sweep

ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ships CrashingWorker to the trials


def by_params(rows: list[dict], **params) -> dict:
    """The one row whose swept values are `params` (dots in keys written as __)."""
    wanted = {k.replace("__", "."): v for k, v in params.items()}
    (row,) = [r for r in rows if all(r[k] == v for k, v in wanted.items())]
    return row


# ---------------------------------------------------------------------------------------------- placement


def test_a_mis_sized_placement_group_is_refused_at_once_instead_of_hanging(ray_session):
    from ray.util.placement_group import placement_group, remove_placement_group

    from raydistill.engine.cluster import TrialPlacement

    group = placement_group([{"CPU": 1}], strategy="PACK")
    ray_session.get(group.ready(), timeout=30)
    try:
        began = time.monotonic()
        with pytest.raises(ConfigError, match="^ray.workers: the trial's placement group has 1 worker bundles but "
                                              "the run starts 2 workers"):
            TrialPlacement(group, first=0, workers=2)
        assert time.monotonic() - began < 5
        assert TrialPlacement(group, first=0, workers=1).options(0)["num_cpus"] == 1
    finally:
        remove_placement_group(group)


@needs_fashion
def test_a_trial_larger_than_the_cluster_stops_the_sweep_before_it_starts(ray_session, tmp_path, capsys):
    path = write_sweep(tmp_path, head_cpus=0.5, search={"ray.workers": {"grid": [1, 2]}})  # 2 workers + 0.5 > 2
    assert main(["tune", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the sample {ray.workers=2}: head_cpus: 0.5 for the trial plus 2 for its workers exceed the cluster's 2" in err
    assert not list((tmp_path / "store" / "tiny").glob("experiment_state*"))


# ---------------------------------------------------------------------------------------------- sweeps on Ray


@pytest.fixture(scope="module")
def asha_sweep(ray_session, tmp_path_factory):
    """Two runnable trials (real vs noise init) and two rejected samples; ASHA with a rung at step 2."""
    folder = tmp_path_factory.mktemp("asha")
    path = write_sweep(folder, search={"init.mode": {"grid": ["real", "noise"]}, "ratbptt.window": {"grid": [2, 8]}},
                       scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2})
    return folder, run_sweep(path, verbose=0)


@pytest.mark.slow
@needs_fashion
def test_every_trial_ends_and_asha_stops_the_weaker_one_early(asha_sweep):
    folder, summary = asha_sweep
    rows = summary["rows"]
    real, noise = by_params(rows, init__mode="real", ratbptt__window=2), by_params(rows, init__mode="noise",
                                                                                   ratbptt__window=2)
    assert real["trial"] == "t000" and real["status"] == "done" and real["step"] == 6
    assert noise["status"] == "stopped" and noise["step"] == 2  # noise init: below the rung's median
    assert summary["best"]["trial"] == "t000" and summary["best"]["val_acc"] > noise["val_acc"]
    table = (folder / "store" / "tiny" / "results.csv").read_text().splitlines()
    assert table[0].startswith("trial,init.mode,ratbptt.window,status,val_acc") and len(table) == 5
    assert table[1].startswith("t000,real,2,done,")
    assert (folder / "store" / "tiny" / "plot.png").stat().st_size > 10_000


@pytest.mark.slow
@needs_fashion
def test_a_rejected_sample_is_listed_with_its_reason_and_never_started(asha_sweep):
    folder, summary = asha_sweep
    experiment = folder / "store" / "tiny"
    rejected = [r for r in summary["rows"] if r["status"] == "rejected"]
    assert sorted(r["init.mode"] for r in rejected) == ["noise", "real"] and summary["rows"][-2:] == rejected
    for row in rejected:
        assert row["ratbptt.window"] == 8 and row["note"].startswith("ratbptt.window: window 8 > unroll 4")
        assert row["val_acc"] is None  # the searcher saw the worst score; the table shows none
        trial = experiment / row["trial"]
        assert not list(trial.glob("checkpoint_*"))  # no run directory was ever reported
        assert len((trial / "result.json").read_text().splitlines()) == 1  # one report, never retried
    with open(experiment / "results.csv") as fh:
        listed = [r for r in csv.DictReader(fh) if r["status"] == "rejected"]
    assert len(listed) == 2 and all(r["note"].startswith("ratbptt.window: window 8 > unroll 4") for r in listed)


@pytest.mark.slow
@needs_fashion
def test_the_best_config_is_a_preset_that_distill_accepts(asha_sweep, tmp_path):
    _, summary = asha_sweep
    preset = Path(summary["best_preset"])
    data = yaml.safe_load(preset.read_text())
    assert data["init"]["mode"] == "real" and data["ratbptt"]["window"] == 2 and data["steps"] == 6
    assert main(["distill", "--preset", str(preset), "--out", str(tmp_path / "again"), "--no-eval", "--quiet"]) == 0
    assert (tmp_path / "again" / "distilled.parquet").exists()


@pytest.mark.slow
@needs_fashion
def test_a_sweep_is_never_started_twice_into_the_same_experiment(asha_sweep, capsys):
    folder, _ = asha_sweep
    assert main(["tune", str(folder / "tiny.yaml")]) == 2
    assert "an experiment already exists at" in capsys.readouterr().err


class CrashingWorker(GradientWorker):
    """Fails every meta-step of boosting stage 2 from step 3 on, `crashes` times in all (counted in files)."""

    marker_dir = ""
    crashes = 2

    def compute(self, data, snapshot, step, slot):
        folder = Path(self.marker_dir)
        if self.cfg.ipc == 2 and step >= 3 and len(list(folder.iterdir())) < self.crashes:
            (folder / f"crash-{len(list(folder.iterdir()))}").touch()
            raise RuntimeError("injected worker crash")
        return super().compute(data, snapshot, step, slot)


@pytest.mark.slow
@needs_fashion
def test_a_failed_boosting_trial_is_retried_from_its_checkpoint(ray_session, tmp_path):
    markers = tmp_path / "crashes"
    markers.mkdir()
    CrashingWorker.marker_dir = str(markers)
    fixed = {**TINY, "steps": 4, "ray.max_consecutive_failures": 1}  # the 2nd failure in a row fails the trial
    path = write_sweep(tmp_path, name="boost", set=fixed, metric="val_acc_mean", scheduler="fifo", max_failures=1,
                       boost={"block": 1, "blocks": 2, "steps_per_block": 4, "budgets": [1, 2]},
                       search={"boost.beta": {"grid": [0.1]}})
    summary = run_sweep(path, verbose=0, worker_cls=CrashingWorker)
    (row,) = summary["rows"]
    assert len(list(markers.iterdir())) == 2  # the trial did fail
    assert row["status"] == "done" and row["step"] == 8
    assert row["resumed_from"] >= 4  # not from scratch: stage 1 (4 steps) came back from the checkpoint
    assert 0 < row["val_acc_mean"] < 100
    final = Path(row["checkpoint"])
    steps = [json.loads(line)["step"] for line in (final / "stage-2" / "metrics.jsonl").read_text().splitlines()
             if "meta_loss" in line]
    assert steps == [1, 2, 3, 4]  # every step of the retried stage exactly once
    assert load_config(summary["best_preset"]).boost.stages[1].beta == 0.1


@pytest.mark.slow
@needs_fashion
def test_resume_after_an_interrupt_finishes_without_rerunning_finished_trials(ray_session, tmp_path):
    path = write_sweep(tmp_path, name="resume", scheduler="fifo", search={"seed": {"grid": [0, 1, 2]}})
    experiment = tmp_path / "store" / "resume"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "tune", str(path), "--quiet",
                             "--address", address], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not (experiment / "t001").exists():  # trials run one at a time: t000 has finished
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out  # interrupted with t001 (or, on a busy machine, t002) unfinished
    assert f"raydistill tune {path} --resume" in out
    finished_before = (experiment / "t000" / "result.json").read_text()

    original = path.read_text()
    changed = yaml.safe_load(original)
    changed["search"]["seed"]["grid"] = [0, 1, 3]
    path.write_text(yaml.safe_dump(changed))  # a changed search space is not a continuation of the experiment
    with pytest.raises(ConfigError, match=r"^--resume: .*resume.yaml changed since the experiment started"):
        run_sweep(path, resume=True, verbose=0)
    path.write_text(original + "# a comment changes nothing\n")

    summary = run_sweep(path, resume=True, verbose=0)
    assert [r["status"] for r in sorted(summary["rows"], key=lambda r: r["trial"])] == ["done"] * 3
    assert (experiment / "t000" / "result.json").read_text() == finished_before  # t000 was not run again
