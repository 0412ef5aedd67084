"""`raydistill prepare`: decode, resize and shard a data set once, on Ray Data (format: raydistill.data.parquet).

An image folder is read with ray.data.read_binary_files, decoded and resized in map_batches (a file PIL cannot
decode is skipped, named in one warning and listed in the manifest) and written with write_parquet; a built-in set
goes through the same map_batches and write from its arrays. A second Ray Data pass reads the written shards back,
hashes them and sums their pixels and classes for the manifest, which is written last. A local destination is
written into a hidden sibling folder that is renamed into place at the end, so DEST is either complete or absent;
for a remote one (s3://, gs://, ...) the manifest is the commit: the loader refuses a set without it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider

import raydistill
from raydistill.config import ConfigError, DataConfig
from raydistill.data.parquet import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, channel_stats, digest, read_shard
from raydistill.data.registry import DATASETS, resolve_root
from raydistill.data.sources import (
    RESIZE,
    FolderSource,
    array_rows,
    check_destination,
    decode_batch,
    list_folder,
    select_classes,
    shard_rows,
)
from raydistill.runtime import connect

_BATCH = 64  # images per map_batches call
_SINK_LOGGER = "ray.data.datasource.file_datasink"


@ray.remote(num_cpus=0)
class _SkipLog:
    """Collects the files the decoders skipped (keyed, so a retried task does not count a file twice)."""

    def __init__(self):
        self.skipped: dict[str, str] = {}

    def add(self, items: list[tuple[str, str]]) -> None:
        self.skipped.update(items)

    def items(self) -> dict[str, str]:
        return self.skipped


class _ShardNames(FilenameProvider):
    """part-TTTTT.parquet per write task (Ray Data adds -K when a task writes several shards)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.parquet"


@dataclass
class _Plan:
    """What one prepare run writes: the source's description, its classes, the image shape and a Dataset per split."""

    source: dict
    classes: list[str]
    shape: tuple[int, int, int]
    resize: str | None
    splits: dict[str, tuple[str, ray.data.Dataset]] = field(default_factory=dict)  # split -> (source split, rows)
    log: object = None


def _folder_plan(root: Path, size: int | None, classes_spec: str | None) -> _Plan:
    if size is None:
        raise ConfigError("--image-size: an image folder's images differ in size; give the square size to store, "
                          "e.g. --image-size 64")
    root = root.resolve()
    listing: FolderSource = list_folder(root, classes_spec)
    index = {name: i for i, name in enumerate(listing.classes)}
    log = _SkipLog.remote()
    plan = _Plan({"kind": "imagefolder", "path": str(root)}, listing.classes, (3, size, size), RESIZE,
                 log=log)
    for split, entry in listing.splits.items():
        folder = str(entry.folder)

        def decode(batch: dict, folder=folder) -> pa.Table:
            table, failed = decode_batch(list(batch["bytes"]), list(batch["path"]), folder, index, size)
            if failed:  # keys relative to SOURCE, e.g. train/n01440764/x.JPEG
                ray.get(log.add.remote([(f"{os.path.basename(folder)}/{key}", error) for key, error in failed]))
            return table

        if not entry.files:
            continue
        ds = ray.data.read_binary_files(entry.files, include_paths=True)
        plan.splits[split] = (entry.folder.name, ds.map_batches(decode, batch_size=_BATCH, batch_format="numpy"))
    return plan


def _dataset_plan(name: str, root: str | None, size: int | None, classes_spec: str | None) -> _Plan:
    cfg = DataConfig(name=name, root=root)
    raw = DATASETS[name](resolve_root(cfg), cfg)
    classes = select_classes(classes_spec, list(raw.class_names))
    remap = np.full(len(raw.class_names), -1, np.int64)
    remap[[raw.class_names.index(c) for c in classes]] = np.arange(len(classes))
    c, h, w = raw.train_x.shape[1:]
    if size is None and h != w:
        raise ConfigError(f"--image-size: {name} images are {w}x{h}; give a square size, e.g. --image-size {min(h, w)}")
    shape = (c, size or h, size or w)
    plan = _Plan({"kind": "dataset", "name": name, "root": str(resolve_root(cfg))}, classes, shape,
                 RESIZE if size not in (None, h) else None)
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        keep = remap[y.numpy()] >= 0
        positions = np.flatnonzero(keep)
        width = len(str(max(len(y) - 1, 0)))
        starts = [{"start": int(s)} for s in range(0, len(positions), _BATCH * 16)]
        ds = ray.data.from_items(starts, override_num_blocks=max(len(starts), 1))
        images, labels = x.numpy()[keep], remap[y.numpy()[keep]]
        images_ref, labels_ref, positions_ref = ray.put(images), ray.put(labels), ray.put(positions)

        def convert(batch: dict, images_ref=images_ref, labels_ref=labels_ref, positions_ref=positions_ref,
                    width=width) -> pa.Table:
            images, labels, positions = ray.get([images_ref, labels_ref, positions_ref])
            parts = []
            for start in batch["start"].tolist():
                stop = min(start + _BATCH * 16, len(positions))
                parts.append(array_rows(images[start:stop], labels[start:stop], positions[start:stop],
                                        size if size != h else None, width))
            return pa.concat_tables(parts)

        plan.splits[split] = (split, ds.map_batches(convert, batch_size=1, batch_format="numpy"))
    return plan


def _write(plan: _Plan, fs: pafs.FileSystem, out: str, shard_mb: float) -> dict:
    """Write every split's shards under `out`; then read them back (Ray Data) for checksums, counts and sums."""
    rows = shard_rows(plan.shape, shard_mb)
    manifest_splits = {}
    sums = np.zeros(plan.shape[0], np.int64)
    sumsq = np.zeros(plan.shape[0], np.int64)
    for split in SPLITS:
        directory = f"{out}/{split}"
        fs.create_dir(directory, recursive=True)
        source_split, ds = plan.splits.get(split, (split, None))
        if ds is not None:
            ds.write_parquet(directory, filesystem=fs, min_rows_per_file=rows, max_rows_per_file=rows,
                             filename_provider=_ShardNames(), mode=SaveMode.OVERWRITE)  # a folder made just now
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(directory)) if i.path.endswith(".parquet"))
        summaries = _summarise(files, fs, plan.shape, len(plan.classes))
        per_class = np.zeros(len(plan.classes), np.int64)
        shards = []
        for path in files:
            s = summaries[os.path.basename(path)]
            per_class += s["per_class"]
            shards.append({"file": f"{split}/{os.path.basename(path)}", "rows": s["rows"], "bytes": s["bytes"],
                           "sha256": s["sha256"]})
            if split == "train":
                sums += s["sums"]
                sumsq += s["sumsq"]
        manifest_splits[split] = {"source": source_split, "count": int(per_class.sum()),
                                  "per_class": dict(zip(plan.classes, per_class.tolist())), "shards": shards}
    pixels = manifest_splits["train"]["count"] * plan.shape[1] * plan.shape[2]
    mean, std = channel_stats(sums, sumsq, pixels)
    return {"splits": manifest_splits, "mean": mean, "std": std}


def _summarise(files: list[str], fs: pafs.FileSystem, shape: tuple, num_classes: int) -> dict[str, dict]:
    """Per shard: bytes, SHA-256, rows, rows per class and pixel sums, computed in parallel on Ray Data."""
    if not files:
        return {}

    def summarise(batch: dict) -> dict:
        out = {k: [] for k in ("path", "bytes", "sha256", "rows", "per_class", "sums", "sumsq")}
        for data, path in zip(batch["bytes"], batch["path"]):
            shard = read_shard(data, shape, num_classes)
            for key, value in (("path", path), ("bytes", len(data)), ("sha256", digest(data)),
                               ("rows", len(shard.labels)), ("per_class", shard.per_class), ("sums", shard.sums),
                               ("sumsq", shard.sumsq)):
                out[key].append(value)
        return {k: np.array(v) if k not in ("path", "sha256") else np.array(v, dtype=object) for k, v in out.items()}

    ds = ray.data.read_binary_files(files, filesystem=fs, include_paths=True)
    result = {}
    for row in ds.map_batches(summarise, batch_size=1, batch_format="numpy").iter_rows():
        result[os.path.basename(row["path"])] = {
            "bytes": int(row["bytes"]), "sha256": str(row["sha256"]), "rows": int(row["rows"]),
            **{k: np.asarray(row[k], np.int64) for k in ("per_class", "sums", "sumsq")},
        }
    return result


@dataclass(frozen=True)
class PrepareOptions:
    """What `prepare` writes: images resized to `image_size` (None: as they are), the `classes` kept (None: all),
    shards of about `shard_mb` MB; `root` is where a built-in data set's files are."""

    image_size: int | None = None
    classes: str | None = None
    shard_mb: float = 256.0
    root: str | None = None


def prepare(source: str, dest: str, options: PrepareOptions = PrepareOptions(), address: str | None = None,
            progress: bool = True) -> dict:
    """Prepare SOURCE (an image folder or a built-in data set name) into DEST; returns the manifest."""
    image_size, classes, shard_mb, root = options.image_size, options.classes, options.shard_mb, options.root
    if not shard_mb > 0:
        raise ConfigError(f"--shard-mb: must be > 0, got {shard_mb:g}")
    if image_size is not None and image_size <= 0:
        raise ConfigError(f"--image-size: must be > 0, got {image_size}")
    fs, path = check_destination(dest)
    started = connect(address)
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = progress
    data_logger, sink_logger = logging.getLogger("ray.data"), logging.getLogger(_SINK_LOGGER)
    levels = data_logger.level, sink_logger.level
    sink_logger.setLevel(logging.ERROR)  # its "replacing contents" notice is about the empty folder made just now
    if not progress:
        data_logger.setLevel(logging.ERROR)
    local = isinstance(fs, pafs.LocalFileSystem)
    out = f"{os.path.dirname(path)}/.{os.path.basename(path)}.prepare-{uuid.uuid4().hex[:8]}" if local else path
    t0 = time.monotonic()
    try:
        fs.create_dir(os.path.dirname(path), recursive=True)
        plan = _plan(source, root, image_size, classes)
        written = _write(plan, fs, out, shard_mb)
        skipped = ray.get(plan.log.items.remote()) if plan.log is not None else {}
        for key, error in sorted(skipped.items()):
            print(f"raydistill: warning: skipped {key}: cannot be read as an image ({error})", file=sys.stderr)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "raydistill_version": raydistill.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": plan.source,
            "image_shape": list(plan.shape), "layout": "CHW", "dtype": "uint8", "resize": plan.resize,
            "classes": plan.classes, "mean": written["mean"], "std": written["std"], "splits": written["splits"],
            "skipped": {"count": len(skipped), "files": [{"file": k, "error": v} for k, v in sorted(skipped.items())]},
            "seconds": round(time.monotonic() - t0, 3),
        }
        with fs.open_output_stream(f"{out}/{MANIFEST}") as stream:  # last: the set is complete once it exists
            stream.write(json.dumps(manifest, indent=1).encode())
        if local:
            fs.move(out, path)
        return manifest
    except BaseException:
        if local:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        ctx.enable_progress_bars = bars
        data_logger.setLevel(levels[0])
        sink_logger.setLevel(levels[1])
        if started:
            ray.shutdown()


def _plan(source: str, root: str | None, size: int | None, classes: str | None) -> _Plan:
    path = Path(source).expanduser()
    if path.is_dir():
        if root is not None:
            raise ConfigError("--root: only for a built-in data set name; SOURCE is already a folder")
        return _folder_plan(path, size, classes)
    builtin = sorted(n for n in DATASETS if n not in ("imagefolder", "parquet"))
    if source not in builtin:
        raise ConfigError(f"SOURCE: {source!r} is neither a folder nor a built-in data set ({', '.join(builtin)})")
    return _dataset_plan(source, root, size, classes)
