"""FRePo, RFAD and KIP end to end: `distill` on Ray with two workers, one of them killed, and in process (the same
set: a retried task rebuilds FRePo's pool member, RFAD's and KIP's networks and its real batch exactly) and `boost`.
Tune sweeps the three in tests/e2e/test_matching_runs.py, beside the matching methods."""

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
def test_on_ray_with_a_killed_worker_and_in_process_give_the_same_set(ray_session, tmp_path, monkeypatch, method):
    """Two workers on Ray, one killed mid-step: exactly one record per step, and the same set (images, learned labels,
    the Platt temperature) as the run in process without Ray."""
    monkeypatch.setattr(DiesOnce, "marker", str(tmp_path / "marker"))
    summary = distill(config_from_dict(tiny(method)), tmp_path / "ray", progress=False, evaluate=False,
                      hooks=Hooks(worker_cls=DiesOnce))
    assert (tmp_path / "marker").exists()  # the worker really died
    assert summary["status"]["applied_steps"] == list(range(STEPS))
    assert main(["distill", "--preset", str(preset(tmp_path, method)), "--out", str(tmp_path / "process"), "--quiet",
                 "--no-eval", "--in-process"]) == 0
    sets = {}
    for where in ("ray", "process"):
        records = steps_logged(tmp_path / where)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert all(len(r["stats"]) == 2 and all(0 <= s["target_accuracy"] <= 1 for s in r["stats"]) for r in records)
        sets[where] = read_distilled(tmp_path / where / "distilled.parquet")
    ray_set, process_set = sets["ray"], sets["process"]
    assert ray_set.metadata["method"] == method and torch.isfinite(ray_set.images).all()
    assert torch.equal(ray_set.images, process_set.images)
    assert (ray_set.soft_labels is not None) == (method != "rfad")
    if ray_set.soft_labels is not None:
        assert torch.equal(ray_set.soft_labels, process_set.soft_labels)
    learned = ray_set.metadata.get("learned", {})
    assert (PLATT in learned) == (method == "rfad")  # the learned temperature travels with the set
    assert learned == process_set.metadata.get("learned", {})


@pytest.mark.parametrize("method", METHODS)
def test_boost_in_process(tmp_path, method):
    out = tmp_path / "boost"
    assert main(["boost", "--preset", str(preset(tmp_path, method)), "--out", str(out), "--quiet", "--no-eval",
                 "--in-process", "--block", "1", "--blocks", "2", "--steps-per-block", "2"]) == 0
    dset = read_distilled(out / "distilled.parquet")
    assert dset.ipc == 2 and sorted(set(dset.blocks.tolist())) == [0, 1]
