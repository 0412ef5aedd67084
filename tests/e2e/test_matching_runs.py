"""DM, CAFE, DC and DSA end to end: `distill` on Ray with two workers, `boost` in process, a killed worker that loses
no step, and one `tune` sweep over every matching and kernel ridge regression method."""

import csv
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import needs_fashion

from raydistill.cli import main
from raydistill.engine.driver import Hooks, distill
from raydistill.engine.worker import GradientWorker
from raydistill.setup import config_from_dict
from raydistill.storage.artifact import read_distilled
from raydistill.tune import run_sweep

pytestmark = [needs_fashion, pytest.mark.slow]

ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # DiesOnce below is shipped by value

METHODS = ("dm", "cafe", "dc", "dsa")
STEPS = 3


def tiny(method: str, **more) -> dict:
    section = {"batch_real": 32} if method == "dm" else {"batch_real": 32, "outer_loop": 3, "inner_loop": 1}
    return {
        "method": method, method: section, "ipc": 1, "steps": STEPS, "init": {"mode": "real"},
        "meta": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.5, "clip_factor": 0},
        "augment": {"strategies": [] if method == "dc" else ["color", "crop", "cutout", "flip", "scale", "rotate"]},
        "data": {"val_size": 200}, "model": {"width": 8},
        "eval": {"every": 0, "val_models": 1, "val_steps": 5, "steps": 5, "num_models": 1},
        "threads": 1, "ray": {"workers": 2, "cpus_per_worker": 1, "worker_threads": 1, "checkpoint_every": 2},
        **more,
    }


def preset(tmp_path: Path, method: str, **more) -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(tiny(method, **more)))
    return path


def steps_logged(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "meta_loss" in r]


class DiesOnce(GradientWorker):
    """Kills its own process (like SIGKILL) the first time it reaches step 1, slot 1."""

    marker = ""

    def compute(self, data, snapshot, step, slot):
        marker = Path(self.marker)
        if step == 1 and slot == 1 and not marker.exists():
            marker.write_text("died")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().compute(data, snapshot, step, slot)


@pytest.mark.parametrize("method", METHODS)
def test_distill_on_ray_with_two_workers(ray_session, tmp_path, method):
    out = tmp_path / "run"
    assert main(["distill", "--preset", str(preset(tmp_path, method)), "--out", str(out), "--quiet", "--no-eval"]) == 0
    records = steps_logged(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(len(r["stats"]) == 2 for r in records)  # one gradient per worker slot, averaged
    if method != "dm":
        assert all(0 <= s["episode"] < 3 and s["net_epochs"] == s["episode"] for r in records for s in r["stats"])
    dset = read_distilled(out / "distilled.parquet")
    assert dset.metadata["method"] == method and torch.isfinite(dset.images).all()


def test_a_killed_dsa_worker_leaves_exactly_one_record_per_step_and_the_in_process_set(ray_session, tmp_path,
                                                                                       monkeypatch):
    """DSA runs the seeded episode and the Siamese augmentation, the code paths the matching methods share."""
    cfg = config_from_dict(tiny("dsa"))
    reference = distill(cfg, tmp_path / "reference", in_process=True, progress=False, evaluate=False)
    monkeypatch.setattr(DiesOnce, "marker", str(tmp_path / "marker"))
    summary = distill(cfg, tmp_path / "run", progress=False, evaluate=False, hooks=Hooks(worker_cls=DiesOnce))
    assert (tmp_path / "marker").exists()  # the worker really died
    assert summary["status"]["applied_steps"] == reference["status"]["applied_steps"] == list(range(STEPS))
    assert [r["step"] for r in steps_logged(tmp_path / "run")] == list(range(1, STEPS + 1))
    same = [read_distilled(tmp_path / d / "distilled.parquet").images for d in ("reference", "run")]
    assert torch.equal(*same)  # the retried task recomputed the same gradient


@pytest.mark.parametrize("method", METHODS)
def test_boost_in_process(tmp_path, method):
    out = tmp_path / "boost"
    assert main(["boost", "--preset", str(preset(tmp_path, method)), "--out", str(out), "--quiet", "--no-eval",
                 "--in-process", "--block", "1", "--blocks", "2", "--steps-per-block", "2"]) == 0
    dset = read_distilled(out / "distilled.parquet")
    assert dset.ipc == 2 and sorted(set(dset.blocks.tolist())) == [0, 1]


def test_one_sweep_tunes_every_matching_and_kernel_method_on_ray(ray_session, tmp_path):
    """The method is a search key: one trial per method, each on its section's defaults (ConvNet width 8, IPC 1)."""
    methods = [*METHODS, "frepo", "rfad", "kip"]
    base = {k: v for k, v in tiny("dm").items() if k != "dm"}
    base.update(augment={"strategies": ["flip"]}, eval={"every": 2, "val_models": 1, "val_steps": 5, "steps": 5})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "methods", "set": {"steps": 2}, "base": str(tmp_path / "base.yaml"),
        "storage": str(tmp_path / "tune"), "search": {"method": {"grid": methods}},
        "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1,
    }))
    rows = list(csv.DictReader(open(run_sweep(sweep, verbose=0)["results"])))
    assert sorted(r["status"] for r in rows) == ["done"] * len(methods)
