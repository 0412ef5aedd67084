"""The run artifact: exact round trips, foreign readers, broken files, crash-safe writes, prefixes, pictures, show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raydistill.storage import artifact, atomic, pictures
from raydistill.watch import summary
from raydistill.storage.artifact import ArtifactError, DistilledSet

from helpers import make_set


def test_round_trip_is_exact(tmp_path):
    for soft in (True, False):
        dset = make_set(soft=soft, blocks=True)
        path = tmp_path / f"soft{soft}.parquet"
        artifact.write_distilled(path, dset)
        back = artifact.read_distilled(path)
        assert torch.equal(back.images, dset.images) and back.images.dtype == torch.float32
        assert torch.equal(back.labels, dset.labels) and back.labels.dtype == torch.int64
        assert torch.equal(back.blocks, dset.blocks) and back.blocks.dtype == torch.int32
        if soft:
            assert torch.equal(back.soft_labels, dset.soft_labels)
        else:
            assert back.soft_labels is None
            assert "soft_label" not in pq.read_schema(path).names
        assert back.metadata == dset.metadata
        assert (back.num_classes, back.ipc) == (4, 3)


def test_run_directory_and_filled_in_metadata(tmp_path):
    dset = DistilledSet(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]))  # no metadata at all
    artifact.write_distilled(tmp_path / artifact.DISTILLED_FILE, dset)
    back = artifact.read_distilled(tmp_path)  # a run directory works as well as the file
    assert back.metadata == {"image_shape": [1, 2, 2], "num_classes": 2}
    assert torch.equal(back.blocks, torch.zeros(4, dtype=torch.int32))


READ_WITH_PYARROW_ONLY = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(sys.argv[1])
    meta = json.loads(table.schema.metadata[b"raydistill"])
    images = table.column("image").combine_chunks().flatten().to_numpy().reshape(-1, *meta["image_shape"])
    labels = table.column("label").to_numpy()
    soft = table.column("soft_label").combine_chunks().flatten().to_numpy().reshape(len(labels), -1)
    assert not any(name.startswith(("raydistill", "torch")) for name in sys.modules), "imported more than pyarrow"
    np.savez(sys.argv[2], images=images, labels=labels, soft=soft)
    """
)


def test_readable_with_pyarrow_alone(tmp_path):
    dset = make_set()
    artifact.write_distilled(tmp_path / "distilled.parquet", dset)
    script = tmp_path / "read.py"
    script.write_text(READ_WITH_PYARROW_ONLY)
    # A fresh interpreter, outside the repository, so nothing of raydistill can be imported by accident.
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "distilled.parquet"), str(tmp_path / "out.npz")],
        check=True, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        assert np.array_equal(out["images"], dset.images.numpy()) and out["images"].shape == (12, 3, 5, 6)
        assert np.array_equal(out["labels"], dset.labels.numpy())
        assert np.array_equal(out["soft"], dset.soft_labels.numpy())


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="no such file.*raydistill distill"):
        artifact.read_distilled(tmp_path / "nope.parquet")


def test_truncated_file(tmp_path):
    path = tmp_path / "distilled.parquet"
    artifact.write_distilled(path, make_set())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="distilled.parquet: not a readable Parquet file"):
        artifact.read_distilled(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "distilled.parquet"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ArtifactError, match="not a readable Parquet file"):
        artifact.read_distilled(path)


def test_flipped_byte_is_caught_by_page_checksums(tmp_path):
    path = tmp_path / "distilled.parquet"
    artifact.write_distilled(path, make_set())
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)  # the image column
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + chunk.total_compressed_size // 2] ^= 0xFF  # in the middle of the pixels, past any page header
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="not a readable Parquet file"):
        artifact.read_distilled(path)


def test_distilled_set_checks_its_shapes():
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        DistilledSet(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        DistilledSet(torch.zeros(2, 1, 2, 2), torch.tensor([0, 2]), metadata={"num_classes": 2})
    with pytest.raises(ValueError, match="num_classes 3 != soft-label width 2"):
        DistilledSet(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), torch.eye(2), metadata={"num_classes": 3})
    with pytest.raises(ValueError, match="image_shape"):
        wrong_shape = DistilledSet(torch.zeros(2, 1, 2, 2), [0, 1], metadata={"image_shape": [3, 2, 2]})
        artifact.write_distilled("never-written.parquet", wrong_shape)


def test_foreign_parquet(tmp_path):
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"image": [1.0, 2.0], "label": [0, 1]}), path)
    with pytest.raises(ArtifactError, match="without 'raydistill' metadata"):
        artifact.read_distilled(path)


def rewrite(path: Path, change) -> None:
    """Rewrite an artifact with plain pyarrow after `change(table, meta)` -> (table, meta)."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"raydistill"])
    table, meta = change(table, meta)
    pq.write_table(table.replace_schema_metadata({b"raydistill": json.dumps(meta)}), path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, m: (t, {**m, "format_version": 99}), "format version 99 is newer.*upgrade raydistill"),
        (lambda t, m: (t.drop_columns(["block"]), m), "missing column.*block"),
        (lambda t, m: (t, {**m, "image_shape": [3, 5, 5]}), "expected fixed_size_list<float> of 75"),
        (lambda t, m: (t, {**m, "num_classes": 7, "class_names": list("abcdefg")}), "soft_label .*num_classes=7"),
        (lambda t, m: (t.set_column(1, "label", pa.array([9] * t.num_rows)), m), "inconsistent contents"),
    ],
)
def test_inconsistent_files(tmp_path, change, message):
    path = tmp_path / "distilled.parquet"
    artifact.write_distilled(path, make_set())
    rewrite(path, change)
    with pytest.raises(ArtifactError, match=message):
        artifact.read_distilled(path)


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "distilled.parquet"
    good = make_set()
    artifact.write_distilled(path, good)
    before = path.read_bytes()

    def half_then_crash(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise RuntimeError("power cut")

    monkeypatch.setattr(artifact.pq, "write_table", half_then_crash)
    with pytest.raises(RuntimeError, match="power cut"):
        artifact.write_distilled(path, make_set(ipc=2))
    monkeypatch.undo()

    def no_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", no_replace)
    with pytest.raises(OSError, match="disk full"):
        artifact.write_distilled(path, make_set(ipc=2))
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write_json(tmp_path / "eval.json", {"a": 1})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert torch.equal(artifact.read_distilled(path).images, good.images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distilled.parquet"]  # no temp files left behind


def test_atomic_helpers(tmp_path):
    atomic.atomic_write_json(tmp_path / "a.json", {"x": np.float32(1.5), "y": np.arange(2), "t": torch.tensor(3)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5, "y": [0, 1], "t": 3}
    atomic.atomic_write_text(tmp_path / "a.json", "replaced")
    assert (tmp_path / "a.json").read_text() == "replaced"
    for step in range(3):
        atomic.append_jsonl(tmp_path / "m.jsonl", {"step": step})
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "m.jsonl"]


def test_prefix_takes_first_k_per_class_in_block_order():
    classes, ipc = 3, 4
    # Two Boost-DD blocks of 2 images per class, stored block 1 first to make sure order is by block, not row.
    labels = torch.tensor([0, 1, 2] * ipc)
    blocks = torch.tensor([1] * 6 + [0] * 6, dtype=torch.int32)
    images = torch.arange(12, dtype=torch.float32).reshape(12, 1, 1, 1)  # each image remembers its row
    dset = DistilledSet(images, labels, None, blocks, {"num_classes": classes, "ipc": ipc})

    two = dset.prefix(2)
    assert two.images.flatten().tolist() == [6, 7, 8, 9, 10, 11]  # exactly block 0
    assert torch.bincount(two.labels).tolist() == [2, 2, 2] and two.blocks.tolist() == [0] * 6
    assert two.ipc == 2 and two.metadata["ipc"] == 2 and dset.metadata["ipc"] == ipc

    three = dset.prefix(3)
    assert three.images.flatten().tolist() == [6, 7, 8, 9, 10, 11, 0, 1, 2]  # block 0, then block 1 by position
    assert torch.bincount(three.labels).tolist() == [3, 3, 3]
    assert torch.equal(dset.prefix(ipc).images.sort(0).values, dset.images)

    soft = make_set(ipc=3, classes=4, soft=True).prefix(1)
    assert soft.soft_labels.shape == (4, 4) and sorted(soft.labels.tolist()) == [0, 1, 2, 3]
    for bad in (0, ipc + 1):
        with pytest.raises(ValueError, match=f"k={bad} is out of range"):
            dset.prefix(bad)


def test_zca_round_trip_without_pickle(tmp_path):
    arrays = {"mean": np.random.rand(12).astype(np.float32), "transform": np.random.rand(12, 12)}
    assert artifact.read_zca(tmp_path) is None
    artifact.write_zca(tmp_path, {**arrays, "inverse": torch.eye(12)})
    back = artifact.read_zca(tmp_path)
    assert set(back) == {"mean", "transform", "inverse"}
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in arrays.items())
    with pytest.raises(ValueError, match="dtype object"):
        artifact.write_zca(tmp_path, {"bad": np.array([{}, None], dtype=object)})
    (tmp_path / "zca.npz").write_bytes(b"\x80\x04junk that looks like a pickle")
    with pytest.raises(ArtifactError, match="zca.npz: unreadable ZCA transform"):
        artifact.read_zca(tmp_path)


def test_to_display_and_save_grid(tmp_path):
    x = torch.tensor([[-2.0, 0.0, 2.0]]).reshape(1, 3, 1, 1)
    shown = pictures.to_display(x, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert shown.flatten().tolist() == [0.0, 0.5, 1.0]  # -2 * 0.25 + 0.5 = 0, clipped where needed
    doubled = pictures.to_display(x, 0.5, 0.25, zca_inverse=lambda t: t * 2)
    assert doubled.flatten().tolist() == [0.0, 0.5, 1.0]

    for channels, mode in ((1, "L"), (3, "RGB")):
        path = tmp_path / f"grid{channels}.png"
        pictures.save_grid(path, np.random.rand(7, channels, 8, 10), nrow=3)
        with Image.open(path) as picture:
            # 3 columns of 10 px and 3 rows of 8 px, 2 px of padding around and between them
            assert picture.size == (3 * 12 + 2, 3 * 10 + 2) and picture.mode == mode


def test_summarise(tmp_path):
    run = tmp_path / "run"
    dset = make_set(soft=True)
    dset.blocks = torch.tensor([0] * 8 + [1] * 4, dtype=torch.int32)
    artifact.write_distilled(run / artifact.DISTILLED_FILE, dset)
    eval_report = {
        "results": {"convnet": {"mean": 71.2, "std": 0.4, "accs": [70.8, 71.6]}},  # percentages
        "baseline": {"convnet": {"mean": 52.1, "std": 1.3, "accs": [50.8, 53.4]}},
        "split": "test",
    }
    atomic.atomic_write_json(run / artifact.EVAL_FILE, eval_report)
    atomic.append_jsonl(run / artifact.METRICS_FILE, {"step": 9, "meta_loss": 0.5})
    atomic.append_jsonl(run / artifact.METRICS_FILE, {"step": 10, "meta_loss": 0.25})
    with open(run / artifact.METRICS_FILE, "a") as fh:
        fh.write('{"step": 11, "meta_lo')  # a crash mid-append

    text = summary.summarise(run)
    print(text)
    assert "dataset:  toy (4 classes)" in text
    assert "images:   12 (3 per class), shape 3x5x6" in text
    assert "labels:   learned (soft)" in text
    assert "blocks:   2 (images per block: 8, 4)" in text
    assert "config:   method ratbptt, unroll 200, window 60, window_mode random," in text and "meta lr 0.001" in text
    assert "eval (test split):" in text
    assert "convnet: 71.2 +- 0.4 % (random real subset: 52.1 +- 1.3 %)" in text
    assert "last:     step 10, meta_loss 0.25" in text


def test_summarise_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no such run directory"):
        summary.summarise(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="distilled.parquet: no such file"):
        summary.summarise(tmp_path)
