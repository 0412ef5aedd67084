"""Data sets: a registry of raw loaders and `load_dataset`, which turns one into normalised train/val/test tensors.

A raw loader reads files only (no downloads, no disk cache) and returns uint8 images (N, C, H, W), int64 labels and
class names. `load_dataset` then scales to [0, 1], holds a seeded validation split out of the training images,
normalises every split with the training split's per-channel statistics and optionally ZCA-whitens them.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from raydistill.config.core import ConfigError, DataConfig
from raydistill.data.zca import ZCA


class DataError(ValueError):
    """A data file exists but cannot be read (truncated, corrupt or not the expected format); names the file."""


@dataclass
class RawData:
    """What a raw loader returns: uint8 images (N, C, H, W), int64 labels, class names indexed by label."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    class_names: list[str]


RawLoader = Callable[[Path, DataConfig], RawData]

DATASETS: dict[str, RawLoader] = {}
_DEFAULT_ROOTS: dict[str, str | None] = {}


def register_dataset(name: str, default_root: str | None = None) -> Callable[[RawLoader], RawLoader]:
    """Register `loader(root, cfg) -> RawData` under `name`; `default_root` is used when data.root is unset."""

    def decorate(loader: RawLoader) -> RawLoader:
        DATASETS[name] = loader
        _DEFAULT_ROOTS[name] = default_root
        return loader

    return decorate


def default_root(name: str) -> str | None:
    """Where data set `name` lives when data.root is not set (None: it has no default location)."""
    return _DEFAULT_ROOTS.get(name)


# ---------------------------------------------------------------------------------------------- the Dataset


@dataclass
class Dataset:
    """Normalised splits ready for training: float32 images (N, C, H, W), int64 labels."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    class_names: list[str]
    mean: list[float]  # per channel, training split, [0, 1] scale
    std: list[float]
    zca: ZCA | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.train_x.shape[1:])

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load `cfg.name` from `cfg.root` (or its default location) and preprocess it; see the module docstring."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: unknown value {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    root = _resolve_root(cfg)
    raw = DATASETS[cfg.name](root, cfg)

    n = raw.train_x.shape[0]
    if cfg.val_size >= n:
        raise ConfigError(
            f"data.val_size: {cfg.val_size} leaves no training images ({n} in {cfg.name}); set data.val_size < {n}"
        )
    train_idx, val_idx = split_indices(n, cfg.val_size, cfg.split_seed)
    train_x, val_x, test_x = (_to_unit(raw.train_x[train_idx]), _to_unit(raw.train_x[val_idx]), _to_unit(raw.test_x))
    train_y, val_y = raw.train_y[train_idx], raw.train_y[val_idx]

    mean, std = _channel_stats(train_x)
    train_x, val_x, test_x = (_normalise(t, mean, std) for t in (train_x, val_x, test_x))

    zca = None
    if cfg.zca:
        zca = ZCA.fit(train_x, cfg.zca_reg)
        train_x, val_x, test_x = (_zca_in_blocks(zca, t) for t in (train_x, val_x, test_x))

    return Dataset(
        name=cfg.name,
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=raw.test_y,
        class_names=list(raw.class_names),
        mean=mean.tolist(),
        std=std.tolist(),
        zca=zca,
    )


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) indices into n training images: a seeded random `val_size` are held out, each part sorted."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    # Sorted so both splits keep the files' order; samplers shuffle anyway, and the sets are what the seed fixes.
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _resolve_root(cfg: DataConfig) -> Path:
    root = cfg.root if cfg.root is not None else default_root(cfg.name)
    if root is None:
        raise ConfigError(f"data.root: data set {cfg.name!r} has no default location; set data.root=/path/to/data")
    if not Path(root).exists():
        raise ConfigError(f"data.root: {root} does not exist; {_install_hint(cfg)}")
    return Path(root)


def _install_hint(cfg: DataConfig) -> str:
    if cfg.name == "fashion-mnist" and cfg.root is None:
        return "install it with 'apt-get install -y dataset-fashion-mnist' or set data.root=DIR holding its idx files"
    return "point data.root at the directory that holds the data set"


def _to_unit(x: Tensor) -> Tensor:
    return x.to(torch.float32).div_(255.0)


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over (N, H, W)."""
    std, mean = torch.std_mean(x, dim=(0, 2, 3))
    # A constant channel (e.g. a blank test fixture) would divide by zero; leave it centred but unscaled.
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def _zca_in_blocks(zca: ZCA, x: Tensor, block: int = 8192) -> Tensor:
    """Whiten a split block by block so the temporary (centred) copy stays small."""
    if x.shape[0] == 0:
        return x
    return torch.cat([zca.transform(b) for b in x.split(block)])


# ---------------------------------------------------------------------------------------------- MNIST-family idx files

_IDX_UBYTE = 0x08
_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte idx file (optionally gzipped) into an array of its declared shape."""
    gzipped = path.suffix == ".gz"
    try:
        data = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip reports truncation as EOFError, corruption as OSError
        what = "not a readable gzip file" if gzipped else "cannot be read"
        raise DataError(f"{path}: {what} ({exc}); replace it with an intact copy") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise DataError(f"{path}: not an unsigned-byte idx file (bad magic number); replace it with an intact copy")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: idx header is truncated; replace it with an intact copy")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise DataError(
            f"{path}: holds {len(data) - header} bytes of data but its header declares {shape} ({expected}); "
            "replace it with an intact copy"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx_dir(root: Path, subdirs: tuple[str, ...]) -> Path | None:
    """The first of root and root/<subdir> that holds the training-images idx file (gzipped or not)."""
    for folder in (root, *(root / s for s in subdirs)):
        stem = folder / _MNIST_FILES["train_x"]
        if stem.exists() or stem.with_name(stem.name + ".gz").exists():
            return folder
    return None


def _read_mnist_family(folder: Path, class_names: list[str], hint: str) -> RawData:
    arrays = {}
    for key, stem in _MNIST_FILES.items():
        plain, gz = folder / stem, folder / (stem + ".gz")
        path = gz if gz.exists() else plain
        if not path.exists():
            raise ConfigError(f"data.root: {gz} (or {plain.name}) is missing; {hint}")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match; "
                "replace the files with intact copies"
            )
        if labels.size and labels.max() >= len(class_names):
            raise DataError(
                f"{folder}: {split} labels go up to {labels.max()} but there are {len(class_names)} classes; "
                "replace the files with intact copies"
            )
    return RawData(
        train_x=torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        class_names=class_names,
    )


@register_dataset("fashion-mnist", default_root="/usr/share/datasets/fashion-mnist")
def _fashion_mnist(root: Path, cfg: DataConfig) -> RawData:
    """The four idx .gz files directly in root, or a torchvision-style root/FashionMNIST/raw/."""
    hint = _install_hint(cfg)
    folder = _find_idx_dir(root, ("FashionMNIST/raw",))
    if folder is None:
        raise ConfigError(f"data.root: no Fashion-MNIST idx files in {root} or {root}/FashionMNIST/raw; {hint}")
    return _read_mnist_family(folder, list(FASHION_MNIST_CLASSES), hint)


@register_dataset("mnist")
def _mnist(root: Path, cfg: DataConfig) -> RawData:
    """A torchvision-style root/MNIST/raw/ (or the idx files directly in root), gzipped or not."""
    hint = "point data.root at a directory holding MNIST/raw/ with the four MNIST idx files"
    folder = _find_idx_dir(root, ("MNIST/raw",))
    if folder is None:
        raise ConfigError(f"data.root: no MNIST idx files in {root}/MNIST/raw or {root}; {hint}")
    return _read_mnist_family(folder, [str(d) for d in range(10)], hint)


# ---------------------------------------------------------------------------------------------- torchvision sets


def _torchvision_split(dataset_cls: type, root: Path, label: str, expects: str, **kwargs):
    """Construct a torchvision data set without downloading; a missing or corrupt copy becomes a ConfigError."""
    try:
        return dataset_cls(str(root), download=False, **kwargs)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted" (its download hint does not apply here)
        raise ConfigError(
            f"data.root: no intact {label} in {root} (missing or corrupted); "
            f"point data.root at the directory that holds {expects}"
        ) from None


def _cifar(dataset_cls_name: str, label: str, folder: str, root: Path) -> RawData:
    import torchvision.datasets as tvd  # imported here: torchvision is slow to import and only these sets need it

    cls = getattr(tvd, dataset_cls_name)
    train = _torchvision_split(cls, root, label, folder, train=True)
    test = _torchvision_split(cls, root, label, folder, train=False)

    def images(ds) -> Tensor:  # torchvision keeps CIFAR as NHWC uint8
        return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))

    return RawData(
        train_x=images(train),
        train_y=torch.as_tensor(train.targets, dtype=torch.int64),
        test_x=images(test),
        test_y=torch.as_tensor(test.targets, dtype=torch.int64),
        class_names=list(train.classes),
    )


@register_dataset("cifar10")
def _cifar10(root: Path, cfg: DataConfig) -> RawData:
    """A torchvision root holding cifar-10-batches-py/."""
    return _cifar("CIFAR10", "CIFAR-10", "cifar-10-batches-py/", root)


@register_dataset("cifar100")
def _cifar100(root: Path, cfg: DataConfig) -> RawData:
    """A torchvision root holding cifar-100-python/ (fine labels)."""
    return _cifar("CIFAR100", "CIFAR-100", "cifar-100-python/", root)


@register_dataset("svhn")
def _svhn(root: Path, cfg: DataConfig) -> RawData:
    """A torchvision root holding train_32x32.mat and test_32x32.mat (needs scipy to read them)."""
    try:
        import scipy.io  # noqa: F401  (torchvision's SVHN reads .mat files with it)
    except ImportError:
        hint = "data.name: svhn needs scipy to read its .mat files; install it with 'pip install scipy'"
        raise ConfigError(hint) from None
    import torchvision.datasets as tvd

    expects = "train_32x32.mat and test_32x32.mat"
    train = _torchvision_split(tvd.SVHN, root, "SVHN", expects, split="train")
    test = _torchvision_split(tvd.SVHN, root, "SVHN", expects, split="test")
    return RawData(  # torchvision already stores SVHN as NCHW uint8 with digit 0 relabelled from 10 to 0
        train_x=torch.from_numpy(np.ascontiguousarray(train.data)),
        train_y=torch.as_tensor(train.labels, dtype=torch.int64),
        test_x=torch.from_numpy(np.ascontiguousarray(test.data)),
        test_y=torch.as_tensor(test.labels, dtype=torch.int64),
        class_names=[str(d) for d in range(10)],
    )


# ---------------------------------------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@register_dataset("imagefolder")
def _imagefolder(root: Path, cfg: DataConfig) -> RawData:
    """root/train/<class>/* and root/val/<class>/* (or root/test/<class>/*) as the test split.

    Class names are the sorted folder names under train/. Images are RGB unless every image is greyscale (then one
    channel); they are resized to data.image_size when it is set and must otherwise share one size.
    """
    train_dir = root / "train"
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise ConfigError(
            f"data.root: {root} needs train/<class>/ and val/<class>/ (or test/<class>/) folders of images; "
            "arrange the images that way or point data.root at such a directory"
        )
    class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise ConfigError(f"data.root: {train_dir} has no class folders; put each class's images in train/<class>/")
    train_files, train_y = _list_images(train_dir, class_names, require_every_class=True)
    test_files, test_y = _list_images(test_dir, class_names, require_every_class=False)

    size = (cfg.image_size, cfg.image_size) if cfg.image_size is not None else None
    images = _read_images(train_files + test_files, size)
    n_train = len(train_files)
    return RawData(
        train_x=images[:n_train],
        train_y=torch.as_tensor(train_y, dtype=torch.int64),
        test_x=images[n_train:],
        test_y=torch.as_tensor(test_y, dtype=torch.int64),
        class_names=class_names,
    )


def _list_images(split_dir: Path, class_names: list[str], require_every_class: bool) -> tuple[list[Path], list[int]]:
    """Image files under split_dir/<class>/ in a stable order, with their labels."""
    index = {name: i for i, name in enumerate(class_names)}
    files: list[Path] = []
    labels: list[int] = []
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in index:
            raise ConfigError(
                f"data.root: {folder} is a class that train/ does not have; add train/{folder.name}/ or remove it"
            )
        found = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        files += found
        labels += [index[folder.name]] * len(found)
    if require_every_class:
        empty = sorted(set(class_names) - {class_names[y] for y in labels})
        if empty:
            raise ConfigError(f"data.root: {split_dir / empty[0]} holds no images; add images or remove the folder")
    if not files:
        raise ConfigError(f"data.root: {split_dir} holds no images in class folders; add split/<class>/ images")
    return files, labels


def _read_images(files: list[Path], size: tuple[int, int] | None) -> Tensor:
    """uint8 (N, C, H, W); C = 1 when every image is greyscale, else 3."""
    from PIL import Image, UnidentifiedImageError  # imported here: only image folders need PIL

    arrays, greyscale = [], True
    for path in files:
        try:
            with Image.open(path) as img:
                greyscale = greyscale and img.mode in ("1", "L", "LA")
                rgb = img.convert("RGB")
                if size is not None and rgb.size != size:
                    rgb = rgb.resize(size, Image.Resampling.BILINEAR)
                arrays.append(np.asarray(rgb))
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: cannot be read as an image ({exc}); replace or remove it") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        (h1, w1, _), (h2, w2, _) = sorted(shapes)[:2]
        raise ConfigError(f"data.image_size: images differ in size ({w1}x{h1}, {w2}x{h2}, ...); set data.image_size=N")
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    # Greyscale converted to RGB has three equal channels; keep one so MNIST-like folders stay 1-channel.
    return (stacked[:, :1] if greyscale else stacked).contiguous()
