"""Prepared data sets: sharded Parquet written by `raydistill prepare`, read back by the `parquet` loader.

A prepared set is a folder (a local path or any URI pyarrow's filesystems accept):

    DEST/manifest.json            written last: a set without it is incomplete and refused
    DEST/train/*.parquet          the training split, in shards of about --shard-mb MiB of pixels
    DEST/test/*.parquet           the test split (an image folder's val/ or test/, a built-in set's test split)

Each shard has three columns: `image` (binary: the uint8 pixels of one image, C*H*W bytes in CHW order),
`label` (int64, an index into the manifest's `classes`) and `key` (string: the source file relative to its split
folder, e.g. n01440764/n01440764_10026.JPEG, or a built-in set's zero-padded position). Rows are read back sorted
by key, so a set loads in the same order however its shards were written. The manifest records the image shape,
the class list, counts per split and class, the training split's per-channel mean and std ([0, 1] units, unbiased),
every shard's row count and SHA-256, the source, the raydistill version and the images skipped as unreadable.

Loading checks every shard against the manifest (SHA-256 of its bytes, row and class counts) before using it. The
bytes are read once and hashed in memory, so the check costs CPU time only (hashlib's SHA-256, roughly 1-2 GB/s on
one core), not a second read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from raydistill.config import ConfigError, DataConfig
from raydistill.data.registry import DataError, RawData, register_dataset
from raydistill.filesystems import open_root

MANIFEST = "manifest.json"
FORMAT = "raydistill-prepared"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("key", pa.string())])
_STATS_ROWS = 1 << 14  # rows per block when summing squares (keeps the uint16 temporary small)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Shard:
    """One shard's rows: images uint8 (n, C, H, W) (a view of the shard's buffer), labels, keys, and its sums."""

    images: np.ndarray
    labels: np.ndarray
    keys: pa.ChunkedArray
    per_class: np.ndarray  # rows per label
    sums: np.ndarray  # per channel, sum of pixel values (int64, exact)
    sumsq: np.ndarray  # per channel, sum of squared pixel values (int64, exact)


def read_shard(data: bytes, shape: tuple[int, int, int], num_classes: int) -> Shard:
    """Parse a shard's bytes; ValueError (or pyarrow's errors) when it is not a shard of this shape."""
    table = pq.read_table(pa.BufferReader(data))
    if not {"image", "label", "key"} <= set(table.column_names):
        raise ValueError(f"columns {table.column_names}, expected image, label, key")
    images = image_array(table.column("image"), shape)
    labels = table.column("label").to_numpy().astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    flat = images.reshape(images.shape[0], shape[0], -1)
    sums = flat.sum(axis=(0, 2), dtype=np.int64)
    sumsq = np.zeros(shape[0], dtype=np.int64)
    for start in range(0, flat.shape[0], _STATS_ROWS):
        block = flat[start:start + _STATS_ROWS].astype(np.uint16)  # 255 ** 2 fits in uint16
        sumsq += (block * block).sum(axis=(0, 2), dtype=np.int64)
    return Shard(images, labels, table.column("key"), np.bincount(labels, minlength=num_classes), sums, sumsq)


def image_array(column: pa.ChunkedArray, shape: tuple[int, int, int]) -> np.ndarray:
    """A binary column of equal-length images as one uint8 (n, C, H, W) array (no copy for a single chunk)."""
    size = int(np.prod(shape))
    parts = []
    for chunk in column.chunks:
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            raise ValueError(f"image column of type {chunk.type}, expected binary")
        if chunk.null_count:
            raise ValueError("null images")
        lengths = pc.binary_length(chunk).to_numpy(zero_copy_only=False)
        if lengths.size and (lengths != size).any():
            bad = int(lengths[lengths != size][0])
            raise ValueError(f"an image of {bad} bytes, expected {size} ({'x'.join(map(str, shape))} uint8)")
        wide = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], dtype=wide)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8) if len(chunk) else np.zeros(0, np.uint8)
        parts.append(data[offsets[0]:offsets[-1]] if len(chunk) else data[:0])
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return flat.reshape(-1, *shape)


def channel_stats(sums: np.ndarray, sumsq: np.ndarray, pixels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and unbiased std in [0, 1] units from exact integer sums over `pixels` values each."""
    mean, std = [], []
    for s, ss in zip(sums.tolist(), sumsq.tolist()):
        mean.append(s / pixels / 255.0 if pixels else 0.0)
        var = (ss * pixels - s * s) / (pixels * (pixels - 1)) if pixels > 1 else 0.0  # exact integers until here
        std.append(max(var, 0.0) ** 0.5 / 255.0)
    return mean, std


# ---------------------------------------------------------------------------------------------- the loader


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_manifest(root: str) -> tuple[pafs.FileSystem, str, dict]:
    """(filesystem, base path, manifest) of the prepared set at `root`; DataError when it is not a complete one."""
    fs, base = open_root(root)
    info = fs.get_file_info(f"{base}/{MANIFEST}")
    if info.type != pafs.FileType.File:
        what = "an incomplete prepared set (an interrupted prepare?)" if fs.get_file_info(base).type == \
            pafs.FileType.Directory else "missing"
        raise DataError(f"{root}: no {MANIFEST}, so it is {what}; prepare it with 'raydistill prepare SOURCE "
                        f"--out {root}' (remove the folder first)")
    try:
        manifest = json.loads(read_bytes(fs, f"{base}/{MANIFEST}"))
    except (ValueError, OSError) as exc:
        raise DataError(f"{root}/{MANIFEST}: not readable JSON ({exc}); prepare the set again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{root}/{MANIFEST}: not a raydistill prepared-set manifest; point data.root at the folder "
                        "'raydistill prepare' wrote")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{root}/{MANIFEST}: format version {manifest.get('format_version')}, this raydistill reads "
                        f"{FORMAT_VERSION}; prepare the set again with this version")
    return fs, base, manifest


def _read_split(fs: pafs.FileSystem, base: str, root: str, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    shape, classes = tuple(manifest["image_shape"]), manifest["classes"]
    entry = manifest["splits"][split]
    listed = {s["file"] for s in entry["shards"]}
    on_disk = fs.get_file_info(pafs.FileSelector(f"{base}/{split}", allow_not_found=True))
    extra = sorted(f"{split}/{i.base_name}" for i in on_disk if i.base_name.endswith(".parquet")
                   and f"{split}/{i.base_name}" not in listed)
    if extra:
        raise DataError(f"{root}/{extra[0]}: a shard the manifest does not list; remove it or prepare the set again")
    images, labels, keys = [], [], []
    counts = np.zeros(len(classes), dtype=np.int64)
    for s in entry["shards"]:
        name = f"{root}/{s['file']}"
        try:
            data = read_bytes(fs, f"{base}/{s['file']}")
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"{name}: listed in the manifest but cannot be read ({exc}); "
                            "prepare the set again") from None
        if digest(data) != s["sha256"]:
            raise DataError(f"{name}: checksum mismatch (SHA-256 differs from the manifest's); the shard is corrupt, "
                            "prepare the set again")
        try:
            shard = read_shard(data, shape, len(classes))
        except (ValueError, OSError, pa.ArrowException) as exc:
            raise DataError(f"{name}: not a readable shard ({exc}); prepare the set again") from None
        if len(shard.labels) != s["rows"]:
            raise DataError(f"{name}: holds {len(shard.labels)} rows, the manifest says {s['rows']}; "
                            "prepare the set again")
        images.append(shard.images)
        labels.append(shard.labels)
        keys.append(shard.keys)
        counts += shard.per_class
    expected = [entry["per_class"][c] for c in classes]
    if counts.tolist() != expected or int(counts.sum()) != entry["count"]:
        raise DataError(f"{root}/{split}: class counts {counts.tolist()} differ from the manifest's {expected}; "
                        "prepare the set again")
    if not images:
        return np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64)
    key_column = pa.chunked_array([c for k in keys for c in k.chunks], type=pa.string())
    order = pc.sort_indices(key_column).to_numpy()
    return np.concatenate(images)[order], np.concatenate(labels)[order]


def read_prepared(root: str, image_size: int | None = None) -> RawData:
    """The prepared set at `root` as uint8 RawData, every shard checked against the manifest first."""
    fs, base, manifest = read_manifest(root)
    shape = tuple(manifest["image_shape"])
    if image_size is not None and (shape[1], shape[2]) != (image_size, image_size):
        raise ConfigError(f"data.image_size: {root} was prepared at {shape[2]}x{shape[1]}, not {image_size}x"
                          f"{image_size}; prepare it again with --image-size {image_size}, or unset data.image_size")
    train_x, train_y = _read_split(fs, base, root, manifest, "train")
    test_x, test_y = _read_split(fs, base, root, manifest, "test")
    return RawData(
        train_x=torch.from_numpy(train_x),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
        class_names=list(manifest["classes"]),
    )


@register_dataset("parquet")
def _parquet(root: Path, cfg: DataConfig) -> RawData:
    """A set written by `raydistill prepare` (data.root: its folder or URI). Images stay uint8 here; load_dataset
    converts them to normalised float32 like every loader's (the engine trains on float tensors today)."""
    return read_prepared(cfg.root if cfg.root is not None else str(root), cfg.image_size)
