"""Ray Tune sweeps: the sweep file, sampling and rejection, trial placement, ASHA, retries and --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import needs_fashion
from raydistill.cli import main
from raydistill.config.core import ConfigError, load_config
from raydistill.tune.core import draw_samples, load_sweep, plan_trials, run_sweep, trial_config, trial_resources
from raydistill.distributed.worker import MetaGradWorker

ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ships CrashingWorker to the trials

REPO = Path(__file__).resolve().parents[1]
TINY = {"steps": 6, "ipc": 1, "model.width": 8, "ratbptt.unroll": 4, "ratbptt.window": 2, "ratbptt.real_batch": 64, "eval.every": 2,
        "eval.val_models": 1, "eval.val_steps": 50, "ray.checkpoint_every": 2, "ray.cpus_per_worker": 1,
        "ray.worker_threads": 1, "threads": 1}


def write_sweep(folder: Path, **fields) -> Path:
    searched = fields.get("search", {}) if isinstance(fields.get("search"), dict) else {}
    body = {"name": "tiny", "base": "quickstart", "set": {k: v for k, v in TINY.items() if k not in searched},
            "storage": str(folder / "store"), "max_concurrent_trials": 1, **fields}
    path = folder / f"{body['name'].replace('/', '_')}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- the sweep file


@pytest.mark.parametrize("fields, names", [
    ({"colour": "red"}, "colour: unknown sweep key"),
    ({"search": {"ratbptt.window": [2, 3]}}, "search.ratbptt.window: expected one of"),
    ({"search": {"meta.lr": {"loguniform": [0, 0.1]}}}, "search.meta.lr: loguniform needs low > 0"),
    ({"search": {"meta.lr": {"uniform": [0.1, 0.01]}}}, "search.meta.lr: uniform needs low < high"),
    ({"search": {"boost.size": {"grid": [1, 2]}}}, "search.boost.size: unknown boosting knob"),
    ({"metric": "val_acc_mean"}, "metric: 'val_acc_mean': a distillation sweep ranks on val_acc"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler: expected {name: asha|fifo"),
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


def test_samples_cover_the_grid_and_draw_the_rest_reproducibly(tmp_path):
    path = write_sweep(tmp_path, num_samples=3, seed=7, search={
        "ratbptt.window": {"grid": [1, 2]}, "meta.lr": {"loguniform": [1e-4, 1e-1]},
        "ratbptt.inner_lr": {"uniform": [0.001, 0.01]}, "ratbptt.unroll": {"randint": [4, 9]},
        "init.mode": {"choice": ["real", "noise"]}})
    sweep = load_sweep(path)
    samples = draw_samples(sweep)
    assert len(samples) == 6 and [s["ratbptt.window"] for s in samples] == [1, 1, 1, 2, 2, 2]
    assert samples == draw_samples(load_sweep(path))  # the seed fixes every draw
    assert all(1e-4 <= s["meta.lr"] <= 1e-1 and 0.001 <= s["ratbptt.inner_lr"] <= 0.01 for s in samples)
    assert all(4 <= s["ratbptt.unroll"] < 9 and s["init.mode"] in ("real", "noise") for s in samples)
    assert len({s["meta.lr"] for s in samples}) == 6


@needs_fashion
def test_invalid_samples_are_rejected_with_the_validators_reason(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, search={"ratbptt.window": {"grid": [2, 8]},
                                                      "ratbptt.real_batch": {"grid": [64, 10**6]}}))
    trials = plan_trials(sweep)
    assert [t.reason is None for t in trials] == [True, False, False, False]
    assert trials[1].reason.startswith("ratbptt.real_batch: 1000000 is larger than the training split")
    assert trials[2].reason.startswith("ratbptt.window: window 8 > unroll 4")


@needs_fashion
def test_a_boosting_sample_with_a_budget_above_its_ipc_is_rejected(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, boost={"beta": 0.1, "steps_per_block": 2, "budgets": [1, 3]},
                                   metric="val_acc_mean",
                                   search={"boost.block": {"grid": [1]}, "boost.blocks": {"grid": [2, 3]}}))
    first, second = plan_trials(sweep)
    assert first.reason.startswith("boost.budgets: budget 3 > the schedule's IPC 2 (2 blocks of 1)")
    assert second.reason is None and [s.block for s in second.cfg.boost.stages] == [1, 1, 1]
    assert second.budgets == [1, 3] and second.total_steps == 6


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "tune_configs").glob("*.yaml")))
def test_every_shipped_sweep_builds_only_valid_trials_or_says_why(name):
    sweep = load_sweep(REPO / "tune_configs" / name)
    built, reasons = 0, []
    for params in draw_samples(sweep):
        try:
            trial_config(sweep, params, check_paths=False)
            built += 1
        except ConfigError as exc:
            reasons.append(str(exc))
    assert built >= 6
    assert all(r.startswith("ratbptt.window: window") for r in reasons)  # only W > T is ever rejected


def test_a_trial_asks_for_exactly_the_workers_it_starts():
    cfg = load_config("quickstart", ["ray.workers=3", "ray.cpus_per_worker=2"], check_paths=False)
    empty_head = trial_resources(cfg, 0, gpus=False)
    assert empty_head.head_bundle_is_empty and empty_head.bundles == [{"CPU": 2.0}] * 3
    with_head = trial_resources(cfg, 1, gpus=True)
    assert with_head.bundles == [{"CPU": 1.0}] + [{"GPU": 1.0, "CPU": 1.0}] * 3


def test_a_mis_sized_placement_group_is_refused_at_once_instead_of_hanging(ray_session):
    from ray.util.placement_group import placement_group, remove_placement_group

    from raydistill.distributed.cluster import TrialPlacement

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


# ---------------------------------------------------------------------------------------------- sweeps on Ray


@pytest.fixture(scope="module")
def asha_sweep(ray_session, tmp_path_factory):
    """Two runnable trials (real vs noise init) and two rejected samples; ASHA with a rung at step 2."""
    folder = tmp_path_factory.mktemp("asha")
    path = write_sweep(folder, search={"init.mode": {"grid": ["real", "noise"]}, "ratbptt.window": {"grid": [2, 8]}},
                       scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2})
    return folder, run_sweep(path, verbose=0)


@needs_fashion
def test_every_trial_ends_and_asha_stops_the_weaker_one_early(asha_sweep):
    folder, summary = asha_sweep
    rows = {r["trial"]: r for r in summary["rows"]}
    assert rows["t000"]["status"] == "done" and rows["t000"]["step"] == 6
    assert rows["t002"]["status"] == "stopped" and rows["t002"]["step"] == 2  # noise init: below the rung's median
    assert rows["t001"]["status"] == rows["t003"]["status"] == "rejected"
    assert summary["best"]["trial"] == "t000" and summary["best"]["val_acc"] > rows["t002"]["val_acc"]
    table = (folder / "store" / "tiny" / "results.csv").read_text().splitlines()
    assert table[0].startswith("trial,init.mode,ratbptt.window,status,val_acc") and len(table) == 5
    assert table[1].startswith("t000,real,2,done,")
    assert (folder / "store" / "tiny" / "plot.png").stat().st_size > 10_000


@needs_fashion
def test_the_best_config_is_a_preset_that_distill_accepts(asha_sweep, tmp_path):
    _, summary = asha_sweep
    preset = Path(summary["best_preset"])
    cfg = load_config(str(preset))
    assert cfg.init.mode == "real" and cfg.ratbptt.window == 2 and cfg.steps == 6
    assert main(["distill", "--preset", str(preset), "--out", str(tmp_path / "again"), "--no-eval", "--quiet"]) == 0
    assert (tmp_path / "again" / "distilled.parquet").exists()


@needs_fashion
def test_a_sweep_is_never_started_twice_into_the_same_experiment(asha_sweep, capsys):
    folder, _ = asha_sweep
    assert main(["tune", str(folder / "tiny.yaml")]) == 2
    assert "an experiment already exists at" in capsys.readouterr().err


class CrashingWorker(MetaGradWorker):
    """Fails every meta-step of boosting stage 2 from step 3 on, `crashes` times in all (counted in files)."""

    marker_dir = ""
    crashes = 2

    def compute(self, snapshot, step, slot):
        folder = Path(self.marker_dir)
        if self.cfg.ipc == 2 and step >= 3 and len(list(folder.iterdir())) < self.crashes:
            (folder / f"crash-{len(list(folder.iterdir()))}").touch()
            raise RuntimeError("injected worker crash")
        return super().compute(snapshot, step, slot)


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


@needs_fashion
def test_resume_after_an_interrupt_finishes_without_rerunning_finished_trials(ray_session, tmp_path):
    path = write_sweep(tmp_path, name="resume", scheduler="fifo", search={"seed": {"grid": [0, 1, 2]}})
    experiment = tmp_path / "store" / "resume"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "tune", str(path), "--quiet",
                             "--address", address], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while not (experiment / "t001").exists():  # trials run one at a time: t000 has finished
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert f"raydistill tune {path} --resume" in out
    finished_before = (experiment / "t000" / "result.json").read_text()
    assert not (experiment / "t002").exists()

    summary = run_sweep(path, resume=True, verbose=0)
    assert [r["status"] for r in sorted(summary["rows"], key=lambda r: r["trial"])] == ["done"] * 3
    assert (experiment / "t000" / "result.json").read_text() == finished_before  # t000 was not run again


@needs_fashion
def test_a_trial_larger_than_the_cluster_stops_the_sweep_before_it_starts(ray_session, tmp_path, capsys):
    path = write_sweep(tmp_path, head_cpus=1.5, search={"ray.workers": {"grid": [1]}})
    assert main(["tune", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "trial t000 {ray.workers=1}: head_cpus: 1.5 for the trial plus 1 for its workers exceed the cluster's 2" in err
    assert not list((tmp_path / "store" / "tiny").glob("experiment_state*"))
