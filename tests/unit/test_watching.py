"""Watching a run: compact log lines, Ray's messages kept short, TensorBoard files, and experiment trackers (the same
on Ray, through Tune and in a log file: tests/integration/test_watching_on_ray.py)."""

import io
import json
import os
import sys
import warnings

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import WATCH_TINY as TINY, needs_fashion, tensorboard_events as events
from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.watch.trackers import check_usable, merged
from raydistill.config.checks import parse_trackers
from raydistill.engine.driver import distill
from raydistill.watch.run import RunTrackers
from raydistill.watch import console as console_module
from raydistill.watch.console import CondensingStream, condense, console
from raydistill.watch.progress import LOG_EVERY_ENV, LineProgress, progress_bar
from raydistill.watch.tensorboard import TENSORBOARD, RunBoard, step_scalars

# What Ray 2.60 printed on a driver's stdout when a worker was SIGKILLed mid-task (colour codes included).
RAY_WORKER_DIED = (
    "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system error. To "
    "troubleshoot the problem, check the logs for the dead worker. Lease ID: 0200 Worker ID: 39b3 Node ID: 1d95 "
    "Worker IP address: 127.0.0.1 Worker port: 33151 Worker PID: 13919 Worker exit type: SYSTEM_ERROR Worker exit "
    "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) "
    "the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the "
    "worker crashed unexpectedly due to SIGSEGV or another unexpected error.")


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
