"""What `raydistill prepare` needs besides Ray: class lists, the source's files, decoding, the manifest.

The Ray Data pipeline that runs these functions in parallel is raydistill.data.prepare; the format it writes
is described in raydistill.data.parquet.

Images from an image folder are decoded with PIL, converted to RGB (greyscale files too: a folder always gives 3
channels), cut to their centred square (side min(W, H)) and resized to N x N with PIL's bilinear filter, which
antialiases when it shrinks. A built-in set keeps its channels (Fashion-MNIST stays 1-channel) and is resized the
same way only when --image-size differs from its size.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from raydistill.config import ConfigError
from raydistill.data.parquet import SCHEMA
from raydistill.filesystems import open_root

SUBSETS_DIR = Path(__file__).resolve().parent / "subsets"
WNID = re.compile(r"n\d{8}")
RESIZE = "centre square crop, then PIL bilinear resize to N x N"


def subset_names() -> list[str]:
    """The shipped class lists (raydistill/data/subsets/NAME.txt)."""
    return sorted(p.stem for p in SUBSETS_DIR.glob("*.txt"))


def read_class_list(path: Path) -> list[str]:
    """One class folder name per line; '#' starts a comment; blank lines are ignored."""
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [n for n in names if n]


def select_classes(spec: str | None, available: list[str]) -> list[str]:
    """The classes to keep, in label order: all (spec None), the first N, or a list file / shipped subset's order."""
    if spec is None:
        return list(available)
    if spec.strip().isdigit():
        n = int(spec)
        if not 1 <= n <= len(available):
            raise ConfigError(f"--classes: {n} is not between 1 and the {len(available)} classes the source has")
        return list(available[:n])
    path = Path(spec).expanduser()
    if path.is_file():
        wanted, where = read_class_list(path), str(path)
    elif spec in subset_names():
        wanted, where = read_class_list(SUBSETS_DIR / f"{spec}.txt"), f"subset {spec}"
    else:
        raise ConfigError(f"--classes: {spec!r} is neither a number, a file nor a shipped subset "
                          f"({', '.join(subset_names())})")
    if not wanted:
        raise ConfigError(f"--classes: {where} names no classes; put one class folder name per line")
    dup = next((c for i, c in enumerate(wanted) if c in wanted[:i]), None)
    if dup is not None:
        raise ConfigError(f"--classes: {where} names {dup} twice; list each class once")
    known = set(available)
    missing = [c for c in wanted if c not in known]
    if missing:
        raise ConfigError(f"--classes: {where} names {len(missing)} classes the source does not have "
                          f"(first: {missing[0]}); check the list or the source")
    return wanted


# ---------------------------------------------------------------------------------------------- image folders


def image_extensions() -> frozenset[str]:
    """Every file extension PIL can open (lower case, with the dot)."""
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass
class FolderSplit:
    folder: Path  # e.g. SOURCE/val
    files: list[str] = field(default_factory=list)  # absolute paths, by class folder then file name


@dataclass
class FolderSource:
    root: Path
    classes: list[str]
    splits: dict[str, FolderSplit]  # "train" and "test"


def list_folder(root: Path, classes_spec: str | None) -> FolderSource:
    """SOURCE/train/<class>/* and SOURCE/val/<class>/* (or test/): the selected classes' image files."""
    train = root / "train"
    test = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not train.is_dir() or test is None:
        raise ConfigError(f"SOURCE: {root} needs train/<class>/ and val/<class>/ (or test/<class>/) folders of "
                          "images (the ImageNet layout)")
    available = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not available:
        raise ConfigError(f"SOURCE: {train} has no class folders; put each class's images in train/<class>/")
    classes = select_classes(classes_spec, available)
    extensions = image_extensions()
    splits = {}
    for split, folder in (("train", train), ("test", test)):
        entry = FolderSplit(folder)
        for name in sorted(classes):  # sorted keys; labels follow `classes`
            sub = folder / name
            found = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in extensions
                           and not f.name.startswith(".")) if sub.is_dir() else []
            if not found and split == "train":
                raise ConfigError(f"SOURCE: {sub} holds no images; add images or leave the class out with --classes")
            entry.files += [str(f) for f in found]
        splits[split] = entry
    return FolderSource(root, classes, splits)


def fit_square(img: Image.Image, size: int | None) -> Image.Image:
    """The centred square of side min(W, H), resized to size x size (bilinear); unchanged when size is None."""
    if size is None:
        return img
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 (3, size, size) RGB; raises on anything PIL cannot fully decode."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode everything now: a truncated file fails here, not later
        rgb = fit_square(img.convert("RGB"), size)
        return np.asarray(rgb).transpose(2, 0, 1)


def decode_batch(data: list[bytes], paths: list[str], folder: str, index: dict[str, int],
                 size: int) -> tuple[pa.Table, list[tuple[str, str]]]:
    """Decode one batch of files from `folder`: (the shard rows, [(key, error)] for files that failed)."""
    images, labels, keys, failed = [], [], [], []
    prefix = folder.rstrip("/") + "/"
    for blob, path in zip(data, paths):
        key = path[len(prefix):] if path.startswith(prefix) else path
        try:
            pixels = decode_image(blob, size)
        except UnidentifiedImageError:
            failed.append((key, "UnidentifiedImageError: not in a format PIL reads"))
            continue
        except Exception as exc:  # noqa: BLE001  (PIL raises many types for broken files; each means "skip it")
            failed.append((key, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))
            continue
        images.append(pixels.tobytes())
        labels.append(index[key.split("/", 1)[0]])
        keys.append(key)
    return rows(images, labels, keys), failed


def rows(images: list[bytes], labels: list[int], keys: list[str]) -> pa.Table:
    return pa.table([pa.array(images, pa.binary()), pa.array(labels, pa.int64()), pa.array(keys, pa.string())],
                    schema=SCHEMA)


# ---------------------------------------------------------------------------------------------- built-in sets


def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 (n, C, H, W) -> (n, C, size, size), each image through fit_square (channel by channel)."""
    if size is None or images.shape[2:] == (size, size):
        return images
    out = np.empty((images.shape[0], images.shape[1], size, size), np.uint8)
    for i, image in enumerate(images):
        for c, plane in enumerate(image):
            out[i, c] = np.asarray(fit_square(Image.fromarray(plane, mode="L"), size))
    return out


def array_rows(images: np.ndarray, labels: np.ndarray, positions: np.ndarray, size: int | None, width: int) -> pa.Table:
    """Rows of a built-in set's arrays; keys are the positions in the source split, zero-padded to `width` digits."""
    resized = np.ascontiguousarray(resize_images(images, size))
    return rows([img.tobytes() for img in resized], labels.tolist(), [f"{p:0{width}d}" for p in positions.tolist()])


# ---------------------------------------------------------------------------------------------- the destination


def check_destination(dest: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of DEST; ConfigError when it exists and is not an empty folder."""
    fs, path = open_root(dest)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"--out: {dest} is a file; choose a new folder for the prepared set")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
        raise ConfigError(f"--out: {dest} already exists and is not empty; choose a new folder (a prepared set is "
                          "never written over)")
    return fs, path


def shard_rows(shape: tuple[int, int, int], shard_mb: float) -> int:
    """Rows per shard: about shard_mb MiB of pixels (the file is smaller: Parquet compresses)."""
    return max(1, int(shard_mb * 2**20) // int(np.prod(shape)))
