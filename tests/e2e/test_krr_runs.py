"""FRePo, RFAD and KIP end to end: `distill` on Ray with two workers and in process (the same set), `boost`, one
`tune` sweep over the three, and a killed worker that loses no step (FRePo: its seeded pool is the state a retried
task must rebuild exactly)."""

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
from raydistill.methods.krr.common import PLATT
from raydistill.setup import config_from_dict
from raydistill.storage.artifact import read_distilled
from raydistill.tune import run_sweep

pytestmark = [needs_fashion, pytest.mark.slow]

ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # DiesOnce below is shipped by value

METHODS = ("frepo", "rfad", "kip")
STEPS = 3
SECTIONS = {"frepo": {"batch_real": 64, "max_online_steps": 3, "pool_size": 2, "batch_train": 10},
            "rfad": {"batch_real": 64, "models": 2}, "kip": {"batch_real": 32}}


def tiny(method: str, **more) -> dict:
    return {
        "method": method, method: SECTIONS[method], "ipc": 1, "steps": STEPS, "init": {"mode": "real"},
        "labels": {"learn": method != "rfad"}, "augment": {"strategies": ["flip"]},
        "meta": {"optimizer": "adam", "lr": 0.003, "clip_factor": 0},
        "data": {"val_size": 200}, "model": {"width": 8, "norm": "none"},
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


@pytest.mark.parametrize("method", METHODS)
def test_distill_on_ray_with_two_workers_and_in_process_give_the_same_set(ray_session, tmp_path, method):
    sets = {}
    for where, flags in (("ray", []), ("process", ["--in-process"])):
        out = tmp_path / where
        assert main(["distill", "--preset", str(preset(tmp_path, method)), "--out", str(out), "--quiet",
                     "--no-eval", *flags]) == 0
        records = steps_logged(out)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert all(len(r["stats"]) == 2 and all(0 <= s["target_accuracy"] <= 1 for s in r["stats"]) for r in records)
        sets[where] = read_distilled(out / "distilled.parquet")
    dset = sets["ray"]
    assert dset.metadata["method"] == method and torch.isfinite(dset.images).all()
    assert (dset.soft_labels is not None) == (method != "rfad")
    assert (PLATT in dset.metadata.get("learned", {})) == (method == "rfad")  # the learned temperature travels along
    assert torch.equal(sets["ray"].images, sets["process"].images)


@pytest.mark.parametrize("method", METHODS)
def test_boost_in_process(tmp_path, method):
    out = tmp_path / "boost"
    assert main(["boost", "--preset", str(preset(tmp_path, method)), "--out", str(out), "--quiet", "--no-eval",
                 "--in-process", "--block", "1", "--blocks", "2", "--steps-per-block", "2"]) == 0
    dset = read_distilled(out / "distilled.parquet")
    assert dset.ipc == 2 and sorted(set(dset.blocks.tolist())) == [0, 1]


def test_one_sweep_tunes_all_three_on_ray(ray_session, tmp_path):
    """One trial per method, each on its own section's defaults but the real batch (the method is a search key)."""
    base = {k: v for k, v in tiny("frepo", eval={"every": 2, "val_models": 1, "val_steps": 5, "steps": 5}).items()
            if k != "frepo"}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "krr", "set": {"steps": 2}, "base": str(tmp_path / "base.yaml"),
        "storage": str(tmp_path / "tune"), "search": {"method": {"grid": list(METHODS)}},
        "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1,
    }))
    rows = list(csv.DictReader(open(run_sweep(sweep, verbose=0)["results"])))
    assert [r["status"] for r in rows] == ["done"] * 3


class DiesOnce(GradientWorker):
    """Kills its own process (like SIGKILL) the first time it reaches step 1, slot 1."""

    marker = ""

    def compute(self, data, snapshot, step, slot):
        marker = Path(self.marker)
        if step == 1 and slot == 1 and not marker.exists():
            marker.write_text("died")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().compute(data, snapshot, step, slot)


def test_a_killed_frepo_worker_leaves_exactly_one_record_per_step(ray_session, tmp_path, monkeypatch):
    cfg = config_from_dict(tiny("frepo"))
    reference = distill(cfg, tmp_path / "reference", progress=False, evaluate=False)
    monkeypatch.setattr(DiesOnce, "marker", str(tmp_path / "marker"))
    summary = distill(cfg, tmp_path / "run", progress=False, evaluate=False, hooks=Hooks(worker_cls=DiesOnce))
    assert (tmp_path / "marker").exists()  # the worker really died
    assert summary["status"]["applied_steps"] == reference["status"]["applied_steps"] == list(range(STEPS))
    assert [r["step"] for r in steps_logged(tmp_path / "run")] == list(range(1, STEPS + 1))
    same = [read_distilled(tmp_path / d / "distilled.parquet") for d in ("reference", "run")]
    assert torch.equal(same[0].images, same[1].images) and torch.equal(same[0].soft_labels, same[1].soft_labels)
