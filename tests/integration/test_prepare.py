"""`raydistill prepare` and the `parquet` loader: a tiny JPEG folder and Fashion-MNIST, prepared on Ray Data, read back
exactly; corrupt files skipped and listed; corrupt shards, missing manifests and existing destinations refused. (The
shipped class lists and the resizing of a built-in set: tests/unit/test_prepare_sources.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raydistill.cli import main
from raydistill.config import ConfigError, DataConfig
from raydistill.data.registry import DATASETS, DataError, load_dataset

from helpers import one_line

FASHION = "/usr/share/datasets/fashion-mnist"
CLASSES = ["n00000003", "n00000001", "n00000002"]  # folder names; sorted order differs from creation order
SIZE = 16


def run(*argv: str) -> tuple[int, str]:
    """raydistill ARGV (quiet), returning the exit code and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*argv, "--quiet"])
    return code, err.getvalue()


def raw(root: str, **kwargs):
    return DATASETS["parquet"](None, DataConfig(name="parquet", root=root, **kwargs))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """train/<wnid>/*.JPEG (3 classes x 6) and val/<wnid>/*.JPEG (x 2), 40x30 random colours, plus a truncated JPEG
    and a text file named .png in train/."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=90)
    whole = (root / "train" / "n00000001" / "img0.JPEG").read_bytes()
    (root / "train" / "n00000001" / "broken.JPEG").write_bytes(whole[: len(whole) // 2])
    (root / "train" / "n00000002" / "notes.png").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def prepared(ray_session, source, tmp_path_factory) -> tuple[Path, str]:
    dest = tmp_path_factory.mktemp("prepared") / "set"
    code, err = run("prepare", str(source), "--out", str(dest), "--image-size", str(SIZE), "--shard-mb", "0.004")
    assert code == 0, err
    return dest, err


def manifest_of(dest: Path) -> dict:
    return json.loads((dest / "manifest.json").read_text())


def expected_pixels(path: Path) -> np.ndarray:
    """The documented transform, done here with PIL: RGB, centred square, bilinear resize; CHW."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        w, h = rgb.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        return np.asarray(rgb.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box)).transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------- an image folder


def test_manifest_counts_skips_shapes_and_checksums(prepared):
    dest, err = prepared
    m = manifest_of(dest)
    assert m["image_shape"] == [3, SIZE, SIZE] and m["layout"] == "CHW" and m["classes"] == sorted(CLASSES)
    assert m["source"]["kind"] == "imagefolder" and m["resize"].startswith("centre square crop")
    train, test = m["splits"]["train"], m["splits"]["test"]
    assert train["per_class"] == {c: 6 for c in sorted(CLASSES)} and train["count"] == 18
    assert test["per_class"] == {c: 2 for c in sorted(CLASSES)} and test["count"] == 6 and test["source"] == "val"
    assert m["skipped"]["count"] == 2
    assert [f["file"] for f in m["skipped"]["files"]] == ["train/n00000001/broken.JPEG", "train/n00000002/notes.png"]
    warnings = [line for line in err.splitlines() if line.startswith("raydistill: warning: skipped")]
    assert len(warnings) == 2 and "broken.JPEG" in warnings[0] and "notes.png" in warnings[1]
    assert len(train["shards"]) > 1  # --shard-mb 0.004: 5 images of 768 bytes per shard
    for split in ("train", "test"):
        files = sorted(p.relative_to(dest).as_posix() for p in (dest / split).glob("*.parquet"))
        assert sorted(s["file"] for s in m["splits"][split]["shards"]) == files
        for s in m["splits"][split]["shards"]:
            data = (dest / s["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        assert sum(s["rows"] for s in m["splits"][split]["shards"]) == m["splits"][split]["count"]
    assert m["raydistill_version"] and m["format_version"] == 1
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # the temporary sibling is gone


def test_loader_returns_the_pil_resized_pixels_in_key_order(prepared, source):
    dest, _ = prepared
    data = raw(str(dest))
    assert data.class_names == sorted(CLASSES)
    for x, y, split, skip in ((data.train_x, data.train_y, "train", {"broken.JPEG", "notes.png"}),
                              (data.test_x, data.test_y, "val", set())):
        files = [(c, f) for c, name in enumerate(sorted(CLASSES))
                 for f in sorted((source / split / name).iterdir()) if f.name not in skip]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (len(files), 3, SIZE, SIZE)
        assert y.tolist() == [c for c, _ in files]
        for row, (_, path) in enumerate(files):
            assert np.array_equal(x[row].numpy(), expected_pixels(path)), path


def test_mean_and_std_match_the_loaded_training_split(prepared):
    dest, _ = prepared
    m, data = manifest_of(dest), raw(str(dest))
    std, mean = torch.std_mean(data.train_x.double() / 255, dim=(0, 2, 3))
    assert np.allclose(m["mean"], mean.numpy(), atol=1e-9) and np.allclose(m["std"], std.numpy(), atol=1e-9)
    dataset = load_dataset(DataConfig(name="parquet", root=str(dest), val_size=3, image_size=SIZE))
    assert dataset.train_x.shape == (15, 3, SIZE, SIZE) and dataset.val_x.shape == (3, 3, SIZE, SIZE)
    assert dataset.test_x.shape == (6, 3, SIZE, SIZE) and dataset.num_classes == 3


def test_a_different_image_size_asks_to_prepare_again(prepared):
    with pytest.raises(ConfigError, match=r"prepared at 16x16, not 32x32; prepare it again with --image-size 32"):
        raw(str(prepared[0]), image_size=32)


def test_file_uri_destination_and_root_with_a_class_file(ray_session, source, prepared, tmp_path):
    listing = tmp_path / "classes.txt"
    listing.write_text("# two classes, in this order\nn00000003\nn00000001  # second\n")
    uri = f"file://{tmp_path / 'uri-set'}"
    code, err = run("prepare", str(source), "--out", uri, "--image-size", str(SIZE), "--classes", str(listing))
    assert code == 0, err
    m = manifest_of(tmp_path / "uri-set")
    assert m["classes"] == ["n00000003", "n00000001"] and m["skipped"]["count"] == 1
    data, full = raw(uri), raw(str(prepared[0]))
    assert data.class_names == ["n00000003", "n00000001"]
    # The full set's images of those classes, in the same (key) order; labels follow the file's order.
    keep = torch.isin(full.train_y, torch.tensor([0, 2]))
    assert torch.equal(data.train_x, full.train_x[keep]) and torch.equal(data.test_x, full.test_x[full.test_y != 1])
    assert data.train_y.tolist() == [1] * 6 + [0] * 6


def test_classes_n_keeps_the_first_n_in_sorted_order(ray_session, source, tmp_path):
    code, err = run("prepare", str(source), "--out", str(tmp_path / "two"), "--image-size", "8", "--classes", "2")
    assert code == 0, err
    m = manifest_of(tmp_path / "two")
    assert m["classes"] == ["n00000001", "n00000002"] and m["splits"]["train"]["count"] == 12
    assert raw(str(tmp_path / "two")).train_x.shape == (12, 3, 8, 8)


# ---------------------------------------------------------------------------------------------- refusals


def test_a_corrupt_shard_stops_the_loader_naming_it(prepared, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(prepared[0], copy)
    shard = copy / manifest_of(copy)["splits"]["train"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError) as exc:
        raw(str(copy))
    assert str(shard) in one_line(exc) and "checksum" in str(exc.value)


def test_a_count_mismatch_or_an_unlisted_shard_is_refused(prepared, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(prepared[0], copy)
    m = manifest_of(copy)
    m["splits"]["test"]["per_class"]["n00000001"] = 3
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="class counts") as exc:
        raw(str(copy))
    one_line(exc)
    shutil.copy(copy / m["splits"]["train"]["shards"][0]["file"], copy / "train" / "stray.parquet")
    with pytest.raises(DataError, match="stray.parquet") as exc:
        raw(str(copy))
    one_line(exc)


def test_a_set_without_manifest_is_refused(prepared, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(prepared[0], copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json") as exc:
        raw(str(copy))
    one_line(exc)


def test_an_existing_destination_is_refused(source, prepared, capsys):
    dest = prepared[0]
    before = manifest_of(dest)
    assert main(["prepare", str(source), "--out", str(dest), "--image-size", "8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err
    assert manifest_of(dest) == before


def test_bad_arguments_exit_2_in_one_line(source, tmp_path, capsys):
    for argv in (["--image-size", "8", "--classes", "nosuchsubset"], ["--classes", "2"],
                 ["--image-size", "8", "--classes", "7"]):
        assert main(["prepare", str(source), "--out", str(tmp_path / "x"), *argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("raydistill: error:"), err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- a built-in set


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_round_trips_exactly(ray_session, tmp_path):
    code, err = run("prepare", "fashion-mnist", "--out", str(tmp_path / "fm"))
    assert code == 0, err
    m = manifest_of(tmp_path / "fm")
    assert m["image_shape"] == [1, 28, 28] and m["splits"]["train"]["count"] == 60000 and m["resize"] is None
    assert m["source"]["kind"] == "dataset" and m["source"]["name"] == "fashion-mnist"
    ours = raw(str(tmp_path / "fm"))
    theirs = DATASETS["fashion-mnist"](Path(FASHION), DataConfig())
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field
    assert ours.class_names == theirs.class_names
    a = load_dataset(DataConfig(name="parquet", root=str(tmp_path / "fm")))
    b = load_dataset(DataConfig(name="fashion-mnist"))
    assert torch.equal(a.train_x.tensor(), b.train_x.tensor()) and torch.equal(a.val_y, b.val_y) and a.mean == b.mean
