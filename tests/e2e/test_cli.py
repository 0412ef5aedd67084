"""End to end on real Fashion-MNIST, tiny: distill -> artifact -> show -> eval, and runs are never overwritten."""

import json
import os

import pyarrow.parquet as pq
import pytest

from raydistill.storage.artifact import read_distilled
from raydistill.cli import main

pytestmark = pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                                reason="needs dataset-fashion-mnist")

TINY = ["steps=4", "ipc=2", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2", "ratbptt.real_batch=64",
        "eval.num_models=2", "eval.steps=10", "eval.every=2", "eval.val_models=1", "eval.val_steps=5",
        "labels.learn=true", "threads=1"]


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["distill", "--preset", "quickstart", *sets(TINY), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.smoke  # `make test`: the quickstart through the CLI on Ray, evaluation included
def test_run_directory_is_complete(run):
    for name in ("distilled.parquet", "metrics.jsonl", "eval.json", "grid.png", "config.yaml"):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "meta_loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and all(m["applied"] for m in steps)
    assert sorted(m["step"] for m in metrics if "val_acc" in m) == [2, 4]  # selection on the validation split
    assert list((run / "checkpoints").glob("ckpt-*.rdck"))


def test_artifact_holds_the_distilled_set_and_its_description(run):
    dset = read_distilled(run / "distilled.parquet")
    assert dset.images.shape == (20, 1, 28, 28)
    assert dset.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert dset.soft_labels.shape == (20, 10) and (dset.soft_labels >= 0).all()
    meta = dset.metadata
    assert meta["dataset"] == "fashion-mnist" and len(meta["class_names"]) == 10
    assert meta["config"]["ratbptt"]["window"] == 2 and meta["selected_step"] in (2, 4)
    assert not meta["zca"]
    # Usable with pyarrow alone.
    table = pq.read_table(run / "distilled.parquet")
    assert table.num_rows == 20 and json.loads(table.schema.metadata[b"raydistill"])["image_shape"] == [1, 28, 28]


def test_report_shows_the_random_subset_baseline(run):
    report = json.loads((run / "eval.json").read_text())
    assert report["split"] == "test" and report["ipc"] == 2
    for part in ("results", "baseline"):
        accs = report[part]["convnet"]["accs"]
        assert len(accs) == 2 and all(0 <= a <= 100 for a in accs)


def test_show_summarises_the_run(run, capsys):
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist" in out and "random real subset" in out


@pytest.fixture
def linear_arch():
    """A registered one-layer model: `eval --arch` works for any registry entry, and this one is fast on CPU."""
    from torch import nn

    from raydistill.models.registry import MODELS, register_model

    @register_model("test-linear")
    def build(in_channels, num_classes, image_size, **_):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))

    yield "test-linear"
    del MODELS["test-linear"]


def test_eval_adds_an_architecture_and_keeps_the_others(run, linear_arch, capsys):
    assert main(["eval", str(run), "--arch", linear_arch, "--models", "1", "--quiet"]) == 0
    assert f"{linear_arch}: distilled" in capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    assert set(report["results"]) == {"convnet", linear_arch}
    assert len(report["results"][linear_arch]["accs"]) == 1 and len(report["results"]["convnet"]["accs"]) == 2


def test_eval_rejects_unknown_arch_and_missing_run(run, tmp_path, capsys):
    assert main(["eval", str(run), "--arch", "mlp9"]) == 2
    assert "--arch: unknown model 'mlp9'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_an_existing_run_is_never_overwritten(run, capsys):
    def contents():
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    before = contents()
    assert main(["distill", *sets(TINY), "--out", str(run), "--quiet"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert contents() == before
