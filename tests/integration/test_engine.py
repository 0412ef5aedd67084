"""The distributed engine: K = 1 is the single-machine algorithm, and no failure loses or repeats a step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ENGINE_STEPS as STEPS, ENGINE_TINY as TINY, FASHION, engine_config as tiny, needs_fashion
from helpers import images_of, metric_steps
from raydistill.storage.artifact import read_distilled
from raydistill.config import ConfigError
from raydistill.engine.driver import Hooks, distill
from raydistill.engine.server import ParameterServer
from raydistill.engine.worker import GradientWorker
from raydistill.runtime import MALLOC_TUNABLES

pytestmark = needs_fashion

# Worker and server subclasses below inject failures; Ray must ship them by value (tests/ is not importable there).
ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def reference_k2(ray_session, tmp_path_factory):
    """An uninterrupted sync run with two workers: what every failure test must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref") / "k2"
    summary = distill(tiny("ray.workers=2"), out, progress=False, evaluate=False)
    return out, summary


@pytest.mark.smoke  # `make test`: a tiny distillation on Ray, bit for bit the in-process one
def test_one_worker_reproduces_the_single_machine_run_bit_for_bit(ray_session, tmp_path):
    distill(tiny(), tmp_path / "local", in_process=True, progress=False, evaluate=False)
    distill(tiny("ray.workers=1"), tmp_path / "ray", progress=False, evaluate=False)
    assert torch.equal(images_of(tmp_path / "local"), images_of(tmp_path / "ray"))
    local = read_distilled(tmp_path / "local" / "distilled.parquet").soft_labels
    assert torch.equal(local, read_distilled(tmp_path / "ray" / "distilled.parquet").soft_labels)


def test_sync_run_applies_every_step_exactly_once(reference_k2):
    out, summary = reference_k2
    assert summary["status"]["applied_steps"] == list(range(STEPS))
    assert metric_steps(out) == list(range(1, STEPS + 1))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert len(record["stats"]) == 2 and record["used"] == 2  # two independent windows averaged per step


def test_workers_run_in_processes_that_keep_freed_memory(reference_k2):
    """ray.reuse_memory (on by default) reaches the gradient workers' processes (its effect:
    tests/integration/test_runtime_on_ray.py)."""
    _, summary = reference_k2
    assert [p["glibc_tunables"] for p in summary["status"]["placement"]] == [MALLOC_TUNABLES] * 2


class DiesOnce(GradientWorker):
    """Kills its own process (like SIGKILL) the first time it reaches step 3, slot 1."""

    marker = ""

    def compute(self, data, snapshot, step, slot):
        marker = Path(self.marker)
        if step == 3 and slot == 1 and not marker.exists():
            marker.write_text("died")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().compute(data, snapshot, step, slot)


def test_a_killed_worker_loses_no_step(reference_k2, tmp_path, monkeypatch):
    monkeypatch.setattr(DiesOnce, "marker", str(tmp_path / "marker"))
    summary = distill(tiny("ray.workers=2"), tmp_path / "run", progress=False, evaluate=False,
                             hooks=Hooks(worker_cls=DiesOnce))
    assert (tmp_path / "marker").exists()  # the worker really died
    assert summary["status"]["applied_steps"] == list(range(STEPS))
    assert torch.equal(images_of(tmp_path / "run"), images_of(reference_k2[0]))  # the retry recomputed the same


def test_actors_take_nothing_from_the_object_store_at_construction(ray_session, tmp_path, capfd):
    """A restarted actor runs its constructor again; arguments that live in the object store may be gone by then
    (ray-project/ray#53727), and Ray says so in an error-level line at every start. The server's set (here 200
    images, above Ray's inline limit) and the workers' and validator's data refs arrive through calls instead."""
    cfg = tiny("ray.workers=2", "ipc=20", "eval.every=3", "eval.val_models=1", "eval.val_steps=2")
    summary = distill(cfg, tmp_path / "run", progress=False, evaluate=False)
    assert summary["status"]["applied_steps"] == list(range(STEPS))
    out, err = capfd.readouterr()
    assert "constructor arguments in the object store" not in out + err


class NoDataRootHere(GradientWorker):
    """A worker on a node without the data: it removes data.root before it starts (the head node alone had it)."""

    def __init__(self, cfg, *args):
        shutil.rmtree(cfg.data.root, ignore_errors=True)
        assert not os.path.exists(cfg.data.root)
        super().__init__(cfg, *args)


def test_workers_need_no_data_root_where_they_run(reference_k2, tmp_path):
    """The driver reads the data once and hands it to the workers through Ray's object store: a worker (and the
    validator) whose node lacks data.root still computes, with the config the driver checked."""
    root = tmp_path / "fashion-mnist"
    shutil.copytree(FASHION, root)
    cfg = tiny("ray.workers=2", f"data.root={root}", "eval.every=3", "eval.val_models=1", "eval.val_steps=2")
    summary = distill(cfg, tmp_path / "run", progress=False, evaluate=False, hooks=Hooks(worker_cls=NoDataRootHere))
    assert not root.exists()
    assert summary["status"]["applied_steps"] == list(range(STEPS))
    assert summary["val_acc"] is not None  # the validator scored the run's snapshots


class ServerDiesOnce(ParameterServer):
    def apply_sync(self, step, *results):
        marker = Path(self.checkpoints.parent / "server-died")
        if step == 3 and not marker.exists():
            marker.write_text("died")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().apply_sync(step, *results)


def test_a_killed_parameter_server_resumes_from_its_checkpoint(reference_k2, tmp_path):
    summary = distill(tiny("ray.workers=2"), tmp_path / "run", progress=False, evaluate=False,
                             hooks=Hooks(server_cls=ServerDiesOnce))
    assert (tmp_path / "run" / "server-died").exists()
    status = summary["status"]
    assert status["restored_step"] == 2  # the last checkpoint before step 3: one interval redone at most
    assert status["applied_steps"] == list(range(STEPS))
    assert metric_steps(tmp_path / "run") == list(range(1, STEPS + 1))
    assert torch.equal(images_of(tmp_path / "run"), images_of(reference_k2[0]))


class NaNFromSlot1(GradientWorker):
    def compute(self, data, snapshot, step, slot):
        result = super().compute(data, snapshot, step, slot)
        if step == 2 and slot == 1:
            result["grads"]["images"] = np.full_like(result["grads"]["images"], np.nan)
        return result


def test_a_non_finite_gradient_is_dropped_and_the_others_apply(ray_session, tmp_path):
    summary = distill(tiny("ray.workers=2"), tmp_path / "run", progress=False, evaluate=False,
                             hooks=Hooks(worker_cls=NaNFromSlot1))
    assert summary["dropped"]["nonfinite"] == 1
    assert summary["status"]["applied_steps"] == list(range(STEPS))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["used"] for r in records] == [2, 2, 1, 2, 2, 2]
    assert torch.isfinite(images_of(tmp_path / "run")).all()


def test_driver_killed_then_resumed_continues_from_the_checkpoint(reference_k2, ray_session, tmp_path):
    out = tmp_path / "run"
    address = ray_session.get_runtime_context().gcs_address
    args = ["--set=" + s for s in TINY + ["steps=40", "ray.workers=2"]]
    driver = subprocess.Popen([sys.executable, "-m", "raydistill.cli", "distill", *args, "--address", address,
                               "--out", str(out), "--quiet", "--no-eval"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("ckpt-0000000[4-9].rdck")) and time.time() < deadline:
        assert driver.poll() is None, "the driver ended before it could be killed"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (out / "distilled.parquet").exists()
    # A crash can also leave a damaged newest checkpoint: the previous good one must be used.
    newest = sorted((out / "checkpoints").glob("ckpt-*.rdck"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])

    with pytest.warns(UserWarning, match="previous good"):  # raised in the server, surfaced by the driver
        summary = distill(None, out, resume=True, progress=False, evaluate=False)
    assert summary["status"]["applied_steps"] == list(range(40))
    assert metric_steps(out) == list(range(1, 41))
    uninterrupted = distill(tiny("ray.workers=2", "steps=40"), tmp_path / "straight", progress=False,
                                   evaluate=False)
    assert uninterrupted["status"]["applied_steps"] == list(range(40))
    assert torch.equal(images_of(out), images_of(tmp_path / "straight"))

    before = (out / "distilled.parquet").read_bytes()
    assert distill(None, out, resume=True, progress=False)["finished"]  # a finished run is left alone
    assert (out / "distilled.parquet").read_bytes() == before


def test_async_mode_applies_the_requested_steps_and_logs_staleness(ray_session, tmp_path):
    summary = distill(tiny("ray.workers=2", "ray.mode=async", "eval.every=3", "eval.val_steps=5",
                                  "eval.val_models=1"), tmp_path / "run", progress=False, evaluate=False)
    assert summary["status"]["step"] == STEPS
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "meta_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["staleness"] >= 0 for r in steps)
    assert sorted(r["step"] for r in records if "val_acc" in r) == [3, 6]  # validation ran beside distillation


def test_the_server_drops_stale_gradients(ray_session, tmp_path):
    cfg = tiny("ray.mode=async", "ray.max_staleness=1")
    learnables = {"images": np.zeros((10, 1, 28, 28), np.float32), "soft_labels": np.eye(10, dtype=np.float32)}
    ps = ParameterServer(cfg, str(tmp_path))
    ps.start(learnables, np.arange(10))
    fresh = {"grads": {"images": np.ones((10, 1, 28, 28), np.float32), "soft_labels": np.zeros((10, 10), np.float32)},
             "loss": 1.0, "stats": {}, "seconds": 0.0, "slot": 0}
    assert ps.apply_async({**fresh, "version": 0})["accepted"]
    assert ps.apply_async({**fresh, "version": 0})["accepted"]  # one version old: allowed
    report = ps.apply_async({**fresh, "version": 0})  # two versions old: dropped
    assert not report["accepted"] and report["reason"] == "stale"
    assert ps.status()["dropped"]["stale"] == 1 and ps.status()["step"] == 2


def test_a_repeated_sync_apply_is_not_applied_twice(ray_session, tmp_path):
    cfg = tiny()
    learnables = {"images": np.zeros((10, 1, 28, 28), np.float32), "soft_labels": np.eye(10, dtype=np.float32)}
    ps = ParameterServer(cfg, str(tmp_path))
    ps.start(learnables, np.arange(10))
    grad = {"grads": {"images": np.ones((10, 1, 28, 28), np.float32), "soft_labels": np.zeros((10, 10), np.float32)},
            "loss": 1.0, "stats": {}, "seconds": 0.0, "slot": 0, "version": 0}
    assert ps.apply_sync(0, grad)["accepted"]
    before = ps.current()["learnables"]["images"].copy()
    assert not ps.apply_sync(0, grad)["accepted"]  # a retried call for a step already done
    assert np.array_equal(ps.current()["learnables"]["images"], before) and ps.status()["applied_steps"] == [0]


def test_a_request_the_cluster_can_never_meet_fails_at_once(ray_session, tmp_path):
    began = time.time()
    with pytest.raises(ConfigError, match="ray.workers: 5 workers need 5 CPU but the cluster has 2"):
        distill(tiny("ray.workers=5"), tmp_path / "run", progress=False, evaluate=False)
    assert time.time() - began < 30
