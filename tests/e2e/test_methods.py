"""The Method interface: a method written against it alone runs through distill, boost and tune; the in-process
path and the Ray path are one loop."""

import csv
import json

import numpy as np
import pytest
import yaml
from helpers import needs_fashion

from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.engine.driver import distill
from raydistill.storage.artifact import read_distilled
from raydistill.storage.checkpoint import latest_checkpoint
from raydistill.tune import run_sweep

pytestmark = needs_fashion

TOY = {
    "method": "helpers.toy_method:ToyMean", "toy_mean": {"real_batch": 128}, "ipc": 1, "steps": 6,
    "init": {"mode": "noise"}, "meta": {"lr": 0.05}, "labels": {"learn": False}, "data": {"val_size": 200},
    "model": {"width": 8}, "eval": {"every": 3, "val_models": 1, "val_steps": 5, "steps": 5, "num_models": 1},
    "ray": {"workers": 1, "cpus_per_worker": 1, "checkpoint_every": 3},
}


@pytest.fixture
def toy_preset(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(TOY))
    return path


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_method_names_its_own_section_and_validates_it(toy_preset):
    cfg = load_config(str(toy_preset))
    assert cfg.method_config.real_batch == 128
    with pytest.raises(ConfigError, match="toy_mean.real_batch"):
        load_config(str(toy_preset), ["toy_mean.real_batch=0"])
    with pytest.raises(ConfigError, match="ratbptt: settings of method ratbptt"):
        load_config(str(toy_preset), ["ratbptt.window=3"])
    with pytest.raises(ConfigError, match="method: unknown method 'nope'"):
        load_config(str(toy_preset), ["method=nope"])


@pytest.mark.smoke  # `make test`: a plug-in method that Ray's workers import by name, through the CLI
def test_a_toy_method_distils_through_the_cli_on_ray(ray_session, toy_preset, tmp_path):
    out = tmp_path / "run"
    assert main(["distill", "--preset", str(toy_preset), "--out", str(out), "--quiet", "--no-eval"]) == 0
    steps = [r for r in records(out) if "meta_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert steps[-1]["meta_loss"] < steps[0]["meta_loss"]  # its own loss goes down
    assert steps[0]["stats"] == [{"classes": 10}]  # the method's statistics, logged as they are
    assert read_distilled(out / "distilled.parquet").metadata["method"] == "helpers.toy_method:ToyMean"
    # Worker-side state is carried by the server and checkpointed: one task per step on slot 0.
    _, arrays, meta = latest_checkpoint(out / "checkpoints")
    assert meta["step"] == 6 and int(np.asarray(arrays["slot.0.tasks"])[0]) == 6


def test_a_toy_method_boosts_through_the_cli(ray_session, toy_preset, tmp_path):
    out = tmp_path / "boost"
    assert main(["boost", "--preset", str(toy_preset), "--out", str(out), "--quiet", "--no-eval", "--block", "1",
                 "--blocks", "2", "--steps-per-block", "3"]) == 0
    dset = read_distilled(out / "distilled.parquet")
    assert dset.ipc == 2 and sorted(set(dset.blocks.tolist())) == [0, 1]


@pytest.mark.slow
def test_a_toy_method_is_swept_by_tune(ray_session, toy_preset, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "toy", "base": str(toy_preset), "set": {"steps": 3}, "storage": str(tmp_path / "tune"),
        "search": {"toy_mean.real_batch": {"grid": [32, 64]}}, "scheduler": {"name": "fifo"},
        "max_concurrent_trials": 1,
    }))
    summary = run_sweep(sweep, verbose=0)
    rows = list(csv.DictReader(open(summary["results"])))
    assert sorted(r["status"] for r in rows) == ["done", "done"]


def test_the_in_process_run_and_the_ray_run_log_the_same_records(ray_session, tmp_path):
    tiny = ["steps=4", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2", "eval.every=2", "eval.val_steps=5",
            "eval.val_models=1", "data.val_size=200", "ratbptt.real_batch=64", "ray.cpus_per_worker=1",
            "threads=1", "ray.worker_threads=1"]  # the same torch thread count on both sides: the same bits
    local = distill(load_config("quickstart", tiny), tmp_path / "local", in_process=True, progress=False,
                    evaluate=False)
    remote = distill(load_config("quickstart", tiny), tmp_path / "ray", progress=False, evaluate=False)
    timing = {"seconds", "worker_seconds"}

    def comparable(run):
        rows = [{k: v for k, v in r.items() if k not in timing} for r in records(run)]
        return sorted(rows, key=lambda r: (r["step"], "val_acc" in r))

    assert comparable(tmp_path / "local") == comparable(tmp_path / "ray")
    # Keys too, timing included (validations may land a step later on Ray: they run beside distillation).
    keys = [sorted(sorted(r) for r in records(tmp_path / d)) for d in ("local", "ray")]
    assert keys[0] == keys[1]
    assert local["selected_step"] == remote["selected_step"] and local["val_acc"] == remote["val_acc"]
    a, b = (read_distilled(tmp_path / d / "distilled.parquet") for d in ("local", "ray"))
    assert np.array_equal(a.images.numpy(), b.images.numpy())
