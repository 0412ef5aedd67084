"""Specification of raydistill.data.registry and raydistill.data.zca: loading, splitting, normalising, whitening, failing clearly."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import raydistill.data.registry as data
from raydistill.config import ConfigError, DataConfig
from raydistill.data.loaders import read_idx
from raydistill.data.registry import DATASETS, DataError, default_root, load_dataset, split_indices
from raydistill.data.zca import ZCA

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
NO_FASHION = f"{FASHION} missing (apt-get install -y dataset-fashion-mnist)"
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason=NO_FASHION)


# ---------------------------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """A torchvision-style MNIST root (MNIST/raw, uncompressed): 40 train and 10 test random 6x6 images."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (40, 6, 6)))
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(40) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 6, 6)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10))
    return tmp_path


def write_png_tree(root: Path, layout: dict[str, dict[str, int]], size: tuple[int, int], mode: str = "RGB") -> None:
    """root/<split>/<class>/<i>.png for each count in layout; pixel values encode the class index."""
    from PIL import Image

    for split, classes in layout.items():
        for c, (name, count) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                value = 40 * c + i
                Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(folder / f"{i}.png")


# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_every_supported_data_set():
    assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder"} <= set(DATASETS)
    assert default_root("fashion-mnist") == "/usr/share/datasets/fashion-mnist"
    assert default_root("mnist") is None
    assert default_root("imagefolder") is None


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion() -> data.Dataset:
    if not FASHION.is_dir():
        pytest.skip(NO_FASHION)
    return load_dataset(DataConfig(name="fashion-mnist", val_size=5000, split_seed=0))


@needs_fashion
def test_fashion_mnist_has_the_documented_shapes_and_classes(fashion):
    assert fashion.train_x.shape == (55000, 1, 28, 28)
    assert fashion.val_x.shape == (5000, 1, 28, 28)
    assert fashion.test_x.shape == (10000, 1, 28, 28)
    assert fashion.train_y.shape == (55000,) and fashion.val_y.shape == (5000,) and fashion.test_y.shape == (10000,)
    assert fashion.image_shape == (1, 28, 28)
    assert fashion.num_train == 55000
    assert fashion.num_classes == 10
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    assert fashion.train_x.dtype == torch.float32 and fashion.train_y.dtype == torch.int64  # what indexing returns
    assert fashion.train_x.nbytes == 55000 * 28 * 28  # held as uint8 until a batch is drawn
    assert set(fashion.test_y.tolist()) == set(range(10))
    assert fashion.zca is None


@needs_fashion
def test_fashion_mnist_training_split_is_normalised(fashion):
    train = fashion.train_x.tensor()
    assert abs(train.mean().item()) < 1e-4
    assert train.std().item() == pytest.approx(1.0, abs=1e-4)
    # Statistics are reported on the [0, 1] scale (Fashion-MNIST: about 0.286 and 0.353).
    assert fashion.mean[0] == pytest.approx(0.286, abs=0.01)
    assert fashion.std[0] == pytest.approx(0.353, abs=0.01)
    # Other splits use the training split's statistics, so they are close to, not exactly, standardised.
    assert abs(fashion.test_x.tensor().mean().item()) < 0.05


@needs_fashion
def test_validation_images_are_the_seeded_held_out_training_images(fashion):
    train_idx, val_idx = split_indices(60000, 5000, seed=0)
    raw_x = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    raw_y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    splits = ((fashion.val_x, fashion.val_y, val_idx), (fashion.train_x, fashion.train_y, train_idx))
    for split_x, split_y, idx in splits:
        assert torch.equal(split_y, torch.from_numpy(raw_y[idx.numpy()].astype(np.int64)))
        unit = split_x[:50, 0] * fashion.std[0] + fashion.mean[0]
        expected = torch.from_numpy(raw_x[idx[:50].numpy()]).float() / 255
        assert torch.allclose(unit, expected, atol=1e-5)


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_indices(1000, 100, seed=3)
    again_train, again_val = split_indices(1000, 100, seed=3)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert len(val) == 100 and len(train) == 900
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    _, other_val = split_indices(1000, 100, seed=4)
    assert not torch.equal(val, other_val)


def test_missing_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=str(missing)):
        load_dataset(DataConfig(name="fashion-mnist", root=str(missing)))


def test_missing_default_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(data._DEFAULT_ROOTS, "fashion-mnist", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset(DataConfig(name="fashion-mnist"))


def test_root_without_the_files_names_the_root(tmp_path):
    with pytest.raises(ConfigError, match=f"no Fashion-MNIST idx files in {tmp_path}"):
        load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path)))


@needs_fashion
def test_missing_one_file_names_it(tmp_path):
    for name in FASHION_FILES[:3]:
        shutil.copy(FASHION / name, tmp_path / name)
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte"):
        load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path)))


@needs_fashion
def test_truncated_gzip_is_a_data_error_naming_the_file(tmp_path):
    for name in FASHION_FILES:
        shutil.copy(FASHION / name, tmp_path / name)
    victim = tmp_path / "train-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(DataError, match=str(victim)) as info:
        load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    assert "\n" not in str(info.value)


def test_torchvision_style_fashion_root_is_accepted(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte.gz", np.zeros((12, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(3))
    ds = load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path), val_size=2))
    assert ds.num_train == 10 and ds.test_x.shape == (3, 1, 28, 28)
    assert ds.class_names[9] == "Ankle boot"


def test_torchvision_data_set_missing_from_root_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=f"no intact CIFAR-10 in {tmp_path}"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


def test_wrong_magic_and_size_mismatch_are_data_errors(tmp_path):
    not_idx = tmp_path / "train-images-idx3-ubyte"
    not_idx.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DataError, match="bad magic"):
        read_idx(not_idx)
    short = tmp_path / "short-idx3-ubyte"
    write_idx(short, np.zeros((4, 3, 3)))
    short.write_bytes(short.read_bytes()[:-5])
    with pytest.raises(DataError, match="header declares"):
        read_idx(short)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="plain.gz"):
        read_idx(not_gzip)


# ---------------------------------------------------------------------------------------------- MNIST-format root


def test_mnist_reads_a_torchvision_root_with_uncompressed_files(tiny_mnist):
    ds = load_dataset(DataConfig(name="mnist", root=str(tiny_mnist), val_size=8, split_seed=1))
    assert ds.train_x.shape == (32, 1, 6, 6) and ds.val_x.shape == (8, 1, 6, 6) and ds.test_x.shape == (10, 1, 6, 6)
    assert ds.class_names == [str(d) for d in range(10)]


def test_val_size_zero_gives_empty_validation_tensors(tiny_mnist):
    ds = load_dataset(DataConfig(name="mnist", root=str(tiny_mnist), val_size=0))
    assert ds.val_x.shape == (0, 1, 6, 6) and ds.val_y.shape == (0,)
    assert ds.num_train == 40


def test_val_size_that_leaves_no_training_images_is_a_config_error(tiny_mnist):
    with pytest.raises(ConfigError, match="data.val_size"):
        load_dataset(DataConfig(name="mnist", root=str(tiny_mnist), val_size=40))


def test_zca_option_whitens_every_split_with_the_training_fit(tiny_mnist):
    ds = load_dataset(DataConfig(name="mnist", root=str(tiny_mnist), val_size=4, zca=True, zca_reg=0.1))
    assert isinstance(ds.zca, ZCA) and ds.zca.num_features == 36
    plain = load_dataset(DataConfig(name="mnist", root=str(tiny_mnist), val_size=4))
    for whitened, normalised in ((ds.train_x, plain.train_x), (ds.val_x, plain.val_x), (ds.test_x, plain.test_x)):
        assert torch.allclose(whitened.tensor(), ds.zca.transform(normalised.tensor()), atol=1e-5)


# ---------------------------------------------------------------------------------------------- image folders


def test_imagefolder_reads_sorted_classes_and_resizes(tmp_path):
    layout = {"train": {"zebra": 3, "ant": 4}, "val": {"zebra": 1, "ant": 2}}
    write_png_tree(tmp_path, layout, size=(10, 7))
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=2, image_size=5))
    assert ds.class_names == ["ant", "zebra"]
    assert ds.image_shape == (3, 5, 5)
    assert ds.num_train + len(ds.val_y) == 7
    assert sorted(ds.train_y.tolist() + ds.val_y.tolist()) == [0, 0, 0, 0, 1, 1, 1]
    assert ds.test_y.tolist() == [0, 0, 1]
    assert len(ds.mean) == 3 and len(ds.std) == 3


def test_imagefolder_uses_test_folder_and_keeps_greyscale_single_channel(tmp_path):
    layout = {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}
    write_png_tree(tmp_path, layout, size=(4, 4), mode="L")
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=0))
    assert ds.image_shape == (1, 4, 4)
    assert ds.test_x.shape == (2, 1, 4, 4)


def test_imagefolder_of_mixed_sizes_asks_for_image_size(tmp_path):
    from PIL import Image

    write_png_tree(tmp_path, {"train": {"a": 2}, "val": {"a": 1}}, size=(4, 4))
    Image.new("RGB", (6, 6)).save(tmp_path / "train" / "a" / "big.png")
    with pytest.raises(ConfigError, match="data.image_size"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=0))


def test_imagefolder_without_a_test_split_names_the_layout(tmp_path):
    write_png_tree(tmp_path, {"train": {"a": 1}}, size=(4, 4))
    with pytest.raises(ConfigError, match="val/<class>/"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=0))


def test_unreadable_image_is_a_data_error_naming_it(tmp_path):
    write_png_tree(tmp_path, {"train": {"a": 2}, "val": {"a": 1}}, size=(4, 4))
    broken = tmp_path / "train" / "a" / "0.png"
    broken.write_bytes(broken.read_bytes()[:20])
    with pytest.raises(DataError, match=str(broken)):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=0))


# ---------------------------------------------------------------------------------------------- ZCA


def correlated_images(n: int = 4000, shape: tuple[int, ...] = (3, 3, 3), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + 3.0).reshape(n, *shape)


def test_zca_inverse_undoes_transform():
    x = correlated_images().float()
    zca = ZCA.fit(x, reg=0.1)
    assert torch.allclose(zca.inverse(zca.transform(x)), x, atol=1e-3)
    x64 = x.double()
    assert torch.allclose(zca.inverse(zca.transform(x64)), x64, atol=1e-9)


def test_zca_whitened_training_features_have_identity_covariance_when_reg_is_tiny():
    x = correlated_images()
    white = ZCA.fit(x, reg=1e-9).transform(x).reshape(len(x), -1)
    assert torch.allclose(white.mean(dim=0), torch.zeros(27, dtype=torch.float64), atol=1e-8)
    cov = torch.cov(white.T)
    assert torch.allclose(cov, torch.eye(27, dtype=torch.float64), atol=1e-5)


def test_zca_regularisation_is_relative_to_the_mean_eigenvalue():
    x = correlated_images()
    zca = ZCA.fit(x, reg=0.5)
    assert zca.ridge == pytest.approx(0.5 * zca.eigenvalues.mean().item())
    # Scaling the data scales the eigenvalues, so the same reg shrinks the same relative amount.
    scaled = ZCA.fit(10 * x, reg=0.5)
    assert torch.allclose(scaled.transform(10 * x), zca.transform(x), atol=1e-8)


def test_zca_round_trips_through_numpy_without_pickle(tmp_path):
    x = correlated_images(n=500)
    zca = ZCA.fit(x, reg=0.1)
    np.savez(tmp_path / "zca.npz", **zca.to_arrays())
    with np.load(tmp_path / "zca.npz", allow_pickle=False) as arrays:
        restored = ZCA.from_arrays(dict(arrays))
    assert torch.equal(restored.transform(x), zca.transform(x))
    assert torch.equal(restored.inverse(x), zca.inverse(x))


def test_zca_rejects_images_of_another_size():
    zca = ZCA.fit(correlated_images(n=100), reg=0.1)
    with pytest.raises(ValueError, match="27 features"):
        zca.transform(torch.zeros(2, 1, 4, 4))
