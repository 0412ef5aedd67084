"""Boost-DD: nested blocks, frozen earlier blocks at beta = 0, per-budget evaluation, prefixes, resume."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from helpers import needs_fashion
from raydistill.storage.artifact import read_distilled
from raydistill.engine.boost import boost
from raydistill.cli import main

TINY = ["steps=3", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2", "ratbptt.real_batch=64",
        "eval.every=0", "eval.num_models=1", "eval.steps=5", "labels.learn=true", "threads=1",
        "ray.worker_threads=1", "ray.cpus_per_worker=1"]


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def boosted(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("boost") / "run"
    args = ["boost", *sets(TINY), "--block", "1", "--blocks", "3", "--beta", "0", "--out", str(out), "--quiet"]
    assert main(args) == 0
    return out


@needs_fashion
def test_beta_zero_freezes_earlier_blocks_bit_for_bit(boosted):
    final = read_distilled(boosted / "distilled.parquet")
    stage1 = read_distilled(boosted / "stage-1" / "distilled.parquet")
    stage2 = read_distilled(boosted / "stage-2" / "distilled.parquet")
    assert torch.equal(final.images[:10], stage1.images)  # block 0 untouched by stages 2 and 3
    assert torch.equal(final.images[:20], stage2.images)
    assert torch.equal(final.soft_labels[:10], stage1.soft_labels)
    assert not torch.equal(final.images[20:], stage2.images[:10])  # the new block did move


@needs_fashion
def test_blocks_survive_the_parquet_round_trip_and_prefixes_are_exact(boosted):
    table = pq.read_table(boosted / "distilled.parquet")  # pyarrow alone
    assert table.column("block").to_pylist() == [0] * 10 + [1] * 10 + [2] * 10
    dset = read_distilled(boosted / "distilled.parquet")
    for k in (1, 2, 3):
        part = dset.prefix(k)
        assert torch.bincount(part.labels, minlength=10).tolist() == [k] * 10
        assert set(part.blocks.tolist()) == set(range(k))


@needs_fashion
def test_every_budget_is_reported_beside_a_random_subset(boosted, capsys):
    report = json.loads((boosted / "eval_budgets.json").read_text())
    assert list(report["budgets"]) == ["1", "2", "3"]
    for k, body in report["budgets"].items():
        assert body["ipc"] == int(k) and "convnet" in body["baseline"]
    assert main(["eval", str(boosted), "--budgets", "1,3", "--models", "1", "--quiet"]) == 0
    assert list(json.loads((boosted / "eval_budgets.json").read_text())["budgets"]) == ["1", "3"]
    assert main(["show", str(boosted)]) == 0
    assert "IPC 3 convnet" in capsys.readouterr().out
    assert main(["eval", str(boosted), "--budgets", "4"]) == 2


@needs_fashion
def test_export_writes_a_prefix_as_a_standalone_set(boosted, tmp_path):
    assert main(["export", str(boosted), "--prefix", "2", "--out", str(tmp_path / "ipc2.parquet")]) == 0
    part = read_distilled(tmp_path / "ipc2.parquet")
    assert len(part.labels) == 20 and part.ipc == 2
    assert main(["export", str(boosted), "--prefix", "9", "--out", str(tmp_path / "x.parquet")]) == 2


@needs_fashion
def test_an_interrupted_boost_resumes_stage_by_stage_to_the_same_set(boosted, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(boosted, partial)
    for name in ("distilled.parquet", "eval.json", "eval_budgets.json", "grid.png"):
        (partial / name).unlink()
    shutil.rmtree(partial / "stage-3")
    shutil.rmtree(partial / "stage-2" / "checkpoints")  # stage 2 interrupted before its first checkpoint...
    (partial / "stage-2" / "distilled.parquet").unlink()  # ...and never finished
    summary = boost(None, partial, resume=True, progress=False, evaluate=False)
    assert summary["ipc"] == 3
    assert torch.equal(read_distilled(partial / "distilled.parquet").images,
                       read_distilled(boosted / "distilled.parquet").images)
    assert boost(None, partial, resume=True, progress=False)["finished"]
