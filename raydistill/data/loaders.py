"""The built-in raw loaders: MNIST-family idx files, torchvision CIFAR / SVHN roots, and class-per-folder images.

Each reads files only (no downloads) and registers itself with raydistill.data.registry under its data set name.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from raydistill.config import ConfigError, DataConfig
from raydistill.data.registry import DataError, RawData, install_hint, register_dataset

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
    hint = install_hint(cfg)
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
