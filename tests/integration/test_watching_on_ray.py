"""Watching runs on Ray: a failing worker's own error, trackers through Ray's MLflow and W&B integrations and Tune's
logger callbacks, and a driver's log in a file (helpers/log_scenario.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from helpers import LOG_SCENARIO, WATCH_TINY as TINY, needs_fashion, tensorboard_events as events
from raydistill.cli import main
from raydistill.engine.driver import EngineError, Hooks, distill
from raydistill.engine.worker import GradientWorker
from raydistill.setup import load_config

ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ships AlwaysFails to the workers


class AlwaysFails(GradientWorker):
    def compute(self, data, snapshot, step, slot):
        raise ValueError("the data shard is unreadable")


@needs_fashion
def test_a_run_that_keeps_failing_names_the_tasks_own_error_not_rays_wrapper(ray_session, tmp_path):
    cfg = load_config("quickstart", TINY + ["ray.max_consecutive_failures=1", "eval.every=0"])
    with pytest.raises(EngineError) as failure:
        distill(cfg, tmp_path / "run", progress=False, evaluate=False, hooks=Hooks(worker_cls=AlwaysFails))
    message = str(failure.value)
    assert message.startswith("2 consecutive failures, the last: ValueError: the data shard is unreadable; ")
    assert "\n" not in message and "\x1b" not in message and "ray::" not in message


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} at {uri}"
    return client, client.search_runs([found.experiment_id])


@needs_fashion
@pytest.mark.slow
def test_a_run_config_logs_to_mlflow_and_wandb_through_rays_integrations(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trackers = f"trackers=[{{name: mlflow, tracking_uri: '{uri}', experiment_name: watch}}, " \
               "{name: wandb, mode: offline}]"
    run = tmp_path / "run"
    distill(load_config("quickstart", TINY + [trackers]), run, in_process=True, progress=False, evaluate=False)
    client, (found,) = mlflow_runs(uri, "watch")
    assert found.info.run_name == "run"
    assert found.data.params["ratbptt.window"] == "2" and found.data.params["ipc"] == "1"
    history = client.get_metric_history(found.info.run_id, "distill/meta_loss")
    assert sorted(m.step for m in history) == list(range(1, 7))
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "distill/val_acc")) == [3, 6]
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


@needs_fashion
@pytest.mark.slow
def test_a_sweep_logs_every_trial_through_tunes_logger_callbacks(ray_session, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = {"name": "watched", "base": "quickstart", "storage": str(tmp_path / "store"), "max_concurrent_trials": 1,
             "set": {k: yaml.safe_load(v) for k, v in (item.split("=") for item in TINY)} | {"steps": 4},
             "search": {"meta.lr": {"grid": [0.01]}},
             "trackers": ["tensorboard", {"name": "mlflow", "tracking_uri": uri},
                          {"name": "wandb", "mode": "offline", "dir": str(tmp_path)}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["tune", str(path), "--quiet"]) == 0
    client, (found,) = mlflow_runs(uri, "watched")  # the experiment is named after the sweep
    assert found.data.params["meta.lr"] == "0.01"
    assert len(client.get_metric_history(found.info.run_id, "val_acc")) == 2  # one per report: steps 2 and 4
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    trial = tmp_path / "store" / "watched" / "t000"
    assert "val_acc" in " ".join(events(trial).Tags()["scalars"])  # Tune's own TensorBoard logger
    assert not list(trial.glob("**/mlflow.db")) and not list(trial.glob("run/wandb"))  # the trial's run logs nothing


@needs_fashion
@pytest.mark.slow
def test_a_run_logged_to_a_file_has_compact_lines_and_no_terminal_frames(ray_session, tmp_path):
    """A subprocess driver (as under `ray job submit`) with its output in a file, and a worker killed mid-run."""
    log = tmp_path / "run.log"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, str(LOG_SCENARIO), str(tmp_path / "run")], stdout=out,
                              stderr=subprocess.STDOUT, env=env, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text and "Traceback" not in text
    lines = text.splitlines()
    progress = [line for line in lines if line.startswith("distill (sync, K=2): step ")]
    assert progress and progress[-1].startswith("distill (sync, K=2): step 8/8 (100%)")
    assert any("val " in line for line in progress)
    died = [line for line in lines if "worker process died" in line]
    assert died and all(len(line) < 200 for line in died)
    assert np.mean([len(line) for line in lines]) < 200
