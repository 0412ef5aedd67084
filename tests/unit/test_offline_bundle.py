"""scripts/offline_bundle.py: the GPU node bundle (Ray without its Java jar, the head of Fashion-MNIST)."""

import os
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from raydistill.config import DataConfig
from raydistill.data.loaders import read_idx
from raydistill.data.registry import load_dataset

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
from offline_bundle import FMNIST, fashion_mnist_head, ray_tarball  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_head_is_the_first_images_and_loads(tmp_path):
    fashion_mnist_head(FASHION, tmp_path, train=300, test=40)
    for stem in FMNIST:
        head, full = read_idx(tmp_path / f"{stem}.gz"), read_idx(FASHION / f"{stem}.gz")
        assert head.shape[0] == (300 if stem.startswith("train") else 40)
        assert head.shape[1:] == full.shape[1:]
        np.testing.assert_array_equal(head, full[: head.shape[0]])
    data = load_dataset(DataConfig(root=str(tmp_path), val_size=100))
    assert (data.num_train, len(data.val_y), len(data.test_y)) == (200, 100, 40)


def test_fashion_mnist_head_names_a_missing_file(tmp_path):
    with pytest.raises(SystemExit, match=r"nowhere/train-images-idx3-ubyte.gz \(or .*\) is missing"):
        fashion_mnist_head(tmp_path / "nowhere", tmp_path / "out", train=10, test=10)


def test_ray_tarball_drops_the_jar_and_keeps_modes(tmp_path):
    wheel = tmp_path / "ray-9.9.9-cp312-cp312-manylinux2014_x86_64.whl"
    files = {"ray/__init__.py": (b"VERSION = 1\n", 0o644), "ray/core/src/ray/raylet/raylet": (b"\x7fELF", 0o755),
             "ray/jars/ray_dist.jar": (b"PK" * 100, 0o644), "ray-9.9.9.dist-info/METADATA": (b"Name: ray\n", 0o644)}
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(zipfile.ZipInfo("ray/"), b"")
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 2, 3, 4, 6))
            info.external_attr = (0o100000 | mode) << 16
            zf.writestr(info, data)
    target = ray_tarball(wheel, tmp_path)
    assert target.name == "ray-9.9.9-cp312-cp312.tar.xz"
    with tarfile.open(target) as tar:
        tar.extractall(tmp_path / "site", filter="data")
    site = tmp_path / "site"
    kept = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert kept == sorted(n for n in files if not n.startswith("ray/jars/"))
    for name in kept:
        assert (site / name).read_bytes() == files[name][0]
    assert os.access(site / "ray/core/src/ray/raylet/raylet", os.X_OK)
    assert time.localtime((site / "ray/__init__.py").stat().st_mtime)[:6] == (2026, 1, 2, 3, 4, 6)
    assert not os.access(site / "ray/__init__.py", os.X_OK)
