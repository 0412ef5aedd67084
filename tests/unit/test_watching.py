"""Watching a run: compact log lines, Ray's messages kept short, TensorBoard files, and experiment trackers."""

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import needs_fashion
from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.watch.trackers import check_usable, merged
from raydistill.config.checks import parse_trackers
from raydistill.engine.driver import EngineError, Hooks, distill
from raydistill.watch.run import RunTrackers
from raydistill.engine.worker import GradientWorker
from raydistill.watch import console as console_module
from raydistill.watch.console import CondensingStream, condense, console
from raydistill.watch.progress import LOG_EVERY_ENV, LineProgress, progress_bar
from raydistill.watch.tensorboard import TENSORBOARD, RunBoard, step_scalars

TESTS = Path(__file__).parent
TINY = ["steps=6", "ipc=1", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2", "ratbptt.real_batch=64",
        "eval.every=3", "eval.val_models=1", "eval.val_steps=5", "data.val_size=200", "ray.checkpoint_every=3",
        "ray.workers=1", "ray.cpus_per_worker=1", "ray.worker_threads=1", "threads=1"]
# What Ray 2.60 printed on a driver's stdout when a worker was SIGKILLed mid-task (colour codes included).
RAY_WORKER_DIED = (
    "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system error. To "
    "troubleshoot the problem, check the logs for the dead worker. Lease ID: 0200 Worker ID: 39b3 Node ID: 1d95 "
    "Worker IP address: 127.0.0.1 Worker port: 33151 Worker PID: 13919 Worker exit type: SYSTEM_ERROR Worker exit "
    "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) "
    "the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the "
    "worker crashed unexpectedly due to SIGSEGV or another unexpected error.")


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalar(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


# ---------------------------------------------------------------------------------------------- log lines


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr("raydistill.watch.progress.time.monotonic", fake)
    return fake


def test_off_a_terminal_progress_is_a_line_every_interval_with_rate_and_eta(clock):
    out = io.StringIO()
    bar = LineProgress(100, "distill (sync, K=2)", "step", out, every_s=30)
    for _ in range(10):  # 10 steps in 20 s: no line yet
        clock.now += 2
        bar.set_postfix({"meta_loss": "2.300", "workers": "2/2"}, refresh=False)
        bar.update(1)
    assert out.getvalue() == ""
    for _ in range(5):  # the step that crosses 30 s writes one line
        clock.now += 2
        bar.update(1)
    (line,) = out.getvalue().splitlines()
    assert line == ("distill (sync, K=2): step 15/100 (15%) | 0.50 step/s | meta_loss 2.300 | workers 2/2 | "
                    "ETA 2m50s")


def test_a_new_validation_result_writes_a_line_at_once_and_close_writes_the_last(clock):
    out = io.StringIO()
    bar = LineProgress(10, "distill", "step", out, every_s=3600)
    clock.now += 1
    bar.update(4)
    bar.set_postfix(val="71.5@4", refresh=False)
    bar.update(0)  # no progress: nothing to say yet
    clock.now += 1
    bar.update(1)
    bar.set_postfix(val="71.5@4", refresh=False)  # unchanged: not notable
    clock.now += 5
    bar.update(5)
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["distill: step 5/10 (50%) | 2.50 step/s | val 71.5@4 | ETA 2s",
                     "distill: step 10/10 (100%) | 1.43 step/s | val 71.5@4 | took 7s"]


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress_bar(5, "x", stream=io.StringIO()), LineProgress)
    bar = progress_bar(5, "x", stream=Terminal())
    assert not isinstance(bar, LineProgress)
    bar.close()
    monkeypatch.setenv(LOG_EVERY_ENV, "7")
    assert progress_bar(5, "x", stream=io.StringIO()).every_s == 7
    monkeypatch.setenv(LOG_EVERY_ENV, "soon")
    assert progress_bar(5, "x", stream=io.StringIO()).every_s == 30


def test_a_dead_workers_paragraph_from_ray_becomes_one_plain_line():
    line = condense(RAY_WORKER_DIED)
    assert line.startswith("(raylet) a worker process died (PID 13919, SYSTEM_ERROR); its task is retried")
    assert "\x1b" not in line and "OOM" not in line and len(line) < 200
    retried = "\x1b[33m(raylet)\x1b[0m Task Dies.compute failed. There are infinite retries remaining, so the task"
    assert condense(retried) == "(raylet) Task Dies.compute failed. There are infinite retries remaining, so the task"


def test_the_condensing_stream_passes_whole_lines_and_flushes_the_rest():
    out = io.StringIO()
    stream = CondensingStream(out)
    stream.write("plain line\n" + RAY_WORKER_DIED[:50])
    assert out.getvalue() == "plain line\n"
    stream.write(RAY_WORKER_DIED[50:] + "\npartial")
    stream.flush()
    first, second, third = out.getvalue().split("\n")
    assert second.startswith("(raylet) a worker process died") and third == "partial"


def test_the_console_restores_what_it_changed(monkeypatch):
    monkeypatch.delenv(LOG_EVERY_ENV, raising=False)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    stdout, showwarning = sys.stdout, warnings.showwarning
    err = io.StringIO()
    monkeypatch.setattr(console_module.sys, "stderr", err)
    with console(log_every_s=5):
        assert os.environ[LOG_EVERY_ENV] == "5" and os.environ["RAY_COLOR_PREFIX"] == "0"  # pytest's stdout: no tty
        assert isinstance(sys.stdout, CondensingStream)
        warnings.warn("checkpoint step-00000010 is damaged; using the one before", UserWarning)
    assert err.getvalue() == "warning: UserWarning: checkpoint step-00000010 is damaged; using the one before\n"
    assert sys.stdout is stdout and warnings.showwarning is showwarning
    assert LOG_EVERY_ENV not in os.environ and "RAY_COLOR_PREFIX" not in os.environ


class AlwaysFails(GradientWorker):
    def compute(self, shared, snapshot, step, slot):
        raise ValueError("the data shard is unreadable")


@needs_fashion
def test_a_run_that_keeps_failing_names_the_tasks_own_error_not_rays_wrapper(ray_session, tmp_path):
    cfg = load_config("quickstart", TINY + ["ray.max_consecutive_failures=1", "eval.every=0"])
    with pytest.raises(EngineError) as failure:
        distill(cfg, tmp_path / "run", progress=False, evaluate=False, hooks=Hooks(worker_cls=AlwaysFails))
    message = str(failure.value)
    assert message.startswith("2 consecutive failures, the last: ValueError: the data shard is unreadable; ")
    assert "\n" not in message and "\x1b" not in message and "ray::" not in message


# ---------------------------------------------------------------------------------------------- TensorBoard


def test_step_scalars_average_the_workers_numeric_statistics():
    record = {"step": 3, "meta_loss": 2.5, "grad_norm": 0.5, "dropped_nonfinite": 1, "applied": True,
              "stats": [{"start": 10, "window": 4, "mode": "random"}, {"start": 20, "window": 4, "flag": True}]}
    assert step_scalars(record, 2.0) == {"distill/meta_loss": 2.5, "distill/grad_norm": 0.5,
                                         "distill/dropped_nonfinite": 1.0, "distill/steps_per_s": 2.0,
                                         "method/start": 15.0, "method/window": 4.0}


def test_a_resumed_board_replaces_the_steps_it_redoes(tmp_path):
    first = RunBoard(tmp_path)
    for step in range(1, 6):
        first.scalars({"distill/meta_loss": 1.0}, step)
    first.close()
    second = RunBoard(tmp_path, start_step=3)  # a restart from the checkpoint at step 3
    for step in range(4, 7):
        second.scalars({"distill/meta_loss": 2.0}, step)
    second.close()
    acc = events(tmp_path / TENSORBOARD)
    values = [(e.step, e.value) for e in acc.Scalars("distill/meta_loss")]
    assert values == [(1, 1.0), (2, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]  # no step twice, the redone ones replaced


@needs_fashion
def test_a_run_writes_its_curves_and_image_grids_for_tensorboard(tmp_path, capsys):
    run = tmp_path / "run"
    distill(load_config("quickstart", TINY), run, in_process=True, progress=False, evaluate=False)
    acc = events(run / TENSORBOARD)
    tags = acc.Tags()
    assert {"distill/meta_loss", "distill/grad_norm", "distill/steps_per_s", "distill/val_acc",
            "distill/dropped_nonfinite", "method/start", "method/window"} <= set(tags["scalars"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["meta_loss"] for r in records if "meta_loss" in r}
    assert scalar(acc, "distill/meta_loss") == pytest.approx(losses)
    assert scalar(acc, "distill/val_acc") == pytest.approx({r["step"]: r["val_acc"] for r in records if "val_acc" in r})
    assert scalar(acc, "method/window") == {step: 2.0 for step in range(1, 7)}
    grids = acc.Images("images/synthetic")
    assert [g.step for g in grids] == [3, 6]  # one per validation
    assert (grids[0].width, grids[0].height) == (10 * 30 + 2, 30 + 2)  # a column per class, 28 px + 2 px padding
    assert main(["show", str(run)]) == 0
    assert f"tensorboard --logdir {run}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- trackers


@pytest.mark.parametrize("raw, message", [
    ("mlflow", "trackers: expected a list"),
    (["comet"], "trackers[0]: expected one of tensorboard, mlflow, wandb"),
    ([{"name": "mlflow", "token": "x"}], "trackers[0].token: not an option of mlflow"),
    ([{"name": "wandb", "mode": "cloudy"}], "trackers[0].mode: expected one of online, offline, disabled"),
    (["wandb", {"name": "wandb"}], "trackers[1]: wandb is named twice"),
])
def test_a_bad_tracker_entry_is_one_line_naming_it(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_trackers(raw)


def test_a_tracker_that_cannot_log_here_is_refused_before_the_run(monkeypatch, tmp_path):
    monkeypatch.setattr("raydistill.watch.trackers.importlib.util.find_spec",
                        lambda name: None if name == "mlflow" else object())
    with pytest.raises(ConfigError, match=r"mlflow needs the mlflow package; pip install 'raydistill\[mlflow\]'"):
        check_usable(parse_trackers(["mlflow"]))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(ConfigError, match="W&B online needs an API key; set WANDB_API_KEY"):
        check_usable(parse_trackers(["wandb"]))
    check_usable(parse_trackers([{"name": "wandb", "mode": "offline"}]))
    assert merged(parse_trackers(["wandb", "mlflow"]), parse_trackers([{"name": "wandb", "mode": "offline"}])) == [
        {"name": "wandb", "mode": "offline"}, {"name": "mlflow"}]


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_line_and_the_run_goes_on(capsys):
    class Broken:
        def log(self, values, step):
            raise ConnectionError("wandb.ai unreachable\nretry later")

        def finish(self):
            raise ConnectionError("still unreachable")

    class Fine:
        def __init__(self):
            self.logged = []

        def log_metrics(self, values, step):
            self.logged.append(step)

        def end_run(self):
            self.logged.append("end")

    trackers = RunTrackers.__new__(RunTrackers)
    fine = Fine()
    trackers.loggers = [("wandb", Broken()), ("mlflow", fine)]
    trackers.log({"distill/meta_loss": 1.0}, 1)
    trackers.log({"distill/meta_loss": 0.9}, 2)
    trackers.close()
    assert fine.logged == [1, 2, "end"]
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("raydistill: warning: wandb stopped logging at step 1 (ConnectionError: wandb.ai unreachable); "
                    "the run goes on, metrics.jsonl has every step")


def test_a_tracker_that_cannot_start_is_one_line_naming_it(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("unable to open database file\nmore detail")

    monkeypatch.setattr("ray.air.integrations.mlflow.setup_mlflow", refuse)
    cfg = load_config("quickstart", ["trackers=[{name: mlflow, tracking_uri: 'sqlite:////nowhere/x.db'}]"],
                      check_paths=False)
    with pytest.raises(ConfigError) as error:
        RunTrackers(cfg, tmp_path / "run")
    assert str(error.value) == ("trackers: mlflow could not start (OSError: unable to open database file); fix its "
                                f"settings or drop it, then continue with: raydistill distill --resume {tmp_path / 'run'}")


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


# ---------------------------------------------------------------------------------------------- a real log file


@needs_fashion
@pytest.mark.slow
def test_a_run_logged_to_a_file_has_compact_lines_and_no_terminal_frames(ray_session, tmp_path):
    """A subprocess driver (as under `ray job submit`) with its output in a file, and a worker killed mid-run."""
    log = tmp_path / "run.log"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, str(TESTS / "log_scenario.py"), str(tmp_path / "run")], stdout=out,
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
