"""The run artifact: a distilled set in one Parquet file plus a few small side files, readable without raydistill.

A run directory holds `distilled.parquet` (one row per synthetic image: `image`, `label`, `soft_label` when labels
were learned, `block`), `zca.npz` when ZCA whitening was used, and `eval.json` / `metrics.jsonl` written by other
parts of raydistill. The Parquet schema metadata key `raydistill` holds a JSON object describing the set. Nothing
here ever unpickles. Paths may be run locations on shared storage (raydistill.storage.store); writes are atomic either
way. Reading the images with pyarrow alone:

    table = pyarrow.parquet.read_table("RUN/distilled.parquet")
    meta = json.loads(table.schema.metadata[b"raydistill"])
    images = table.column("image").combine_chunks().flatten().to_numpy().reshape(-1, *meta["image_shape"])
    labels = table.column("label").to_numpy()

Images are in the training space: normalised per channel with meta["normalisation"]["mean"] / ["std"] and, when
meta["zca"] is true, ZCA-whitened with the transform in zca.npz.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raydistill.storage.atomic import atomic_path, atomic_write_bytes, json_default
from raydistill.storage.store import Location, RunPath, location, one_line

FORMAT_VERSION = 1
MAX_METADATA_BYTES = 16 * 2**20  # a config, class names and learned scalars: far below this for any real set
MAX_SIDE = 4096  # image channels / height / width
MAX_CLASSES = 1_000_000
META_KEY = b"raydistill"
DISTILLED_FILE = "distilled.parquet"
ZCA_FILE = "zca.npz"
EVAL_FILE = "eval.json"
BUDGETS_FILE = "eval_budgets.json"  # Boost-DD: accuracy per nested budget
METRICS_FILE = "metrics.jsonl"


class ArtifactError(ValueError):
    """A run artifact that cannot be used; the message is one line naming the file, the problem and the fix."""


# ---------------------------------------------------------------------------------------------- the distilled set


@dataclass
class DistilledSet:
    """A distilled data set in the training space.

    images: float32 (n, C, H, W); labels: int64 (n,) hard labels; soft_labels: float32 (n, classes) or None when
    labels were not learned; blocks: int32 (n,) Boost-DD block per image (None: all 0); metadata: JSON-able dict
    (dataset, class_names, ipc, image_shape, normalisation, zca, config, ...). Arrays are converted to tensors of those dtypes and detached; the device is kept.
    """

    images: torch.Tensor
    labels: torch.Tensor
    soft_labels: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = torch.as_tensor(self.images).detach().to(torch.float32)
        self.labels = torch.as_tensor(self.labels).detach().to(torch.int64)
        if self.soft_labels is not None:
            self.soft_labels = torch.as_tensor(self.soft_labels).detach().to(torch.float32)
        if self.blocks is None:
            self.blocks = torch.zeros(len(self.labels), dtype=torch.int32, device=self.labels.device)
        self.blocks = torch.as_tensor(self.blocks).detach().to(torch.int32)
        self.metadata = dict(self.metadata)
        self._check()

    def _check(self) -> None:
        if self.images.dim() != 4 or len(self.images) == 0:
            shape = tuple(self.images.shape)
            raise ValueError(f"DistilledSet: images must be a non-empty (n, C, H, W) tensor, got {shape}")
        n = len(self.images)
        for name, t in (("labels", self.labels), ("blocks", self.blocks)):
            if tuple(t.shape) != (n,):
                raise ValueError(f"DistilledSet: {name} must have shape ({n},) to match images, got {tuple(t.shape)}")
        if self.soft_labels is not None and (self.soft_labels.dim() != 2 or len(self.soft_labels) != n):
            raise ValueError(f"DistilledSet: soft_labels must be ({n}, classes), got {tuple(self.soft_labels.shape)}")
        k = self.num_classes
        if self.metadata.get("num_classes", k) != k:
            declared = self.metadata["num_classes"]
            raise ValueError(f"DistilledSet: metadata num_classes {declared} != soft-label width {k}")
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= k:
            raise ValueError(f"DistilledSet: labels must lie in [0, {k}) for {k} classes")

    @property
    def num_classes(self) -> int:
        """Soft-label width, else metadata num_classes / class_names, else the largest label + 1."""
        if self.soft_labels is not None:
            return int(self.soft_labels.shape[1])
        if "num_classes" in self.metadata:
            return int(self.metadata["num_classes"])
        if "class_names" in self.metadata:
            return len(self.metadata["class_names"])
        return int(self.labels.max()) + 1

    @property
    def ipc(self) -> int:
        """Images per class, assuming a balanced set."""
        return len(self.labels) // self.num_classes

    def prefix(self, k: int) -> DistilledSet:
        """The first `k` images of every class in (block, position) order, as a new set (the Boost-DD nesting).

        Rows keep their relative (block, position) order; metadata is copied with `ipc` set to k.
        """
        labels = self.labels.cpu().numpy()
        counts = np.bincount(labels, minlength=self.num_classes)
        if not 1 <= k <= int(counts.min()):
            raise ValueError(f"prefix: k={k} is out of range; choose 1 <= k <= {int(counts.min())} (images per class)")
        positions = np.arange(len(labels))
        order = np.lexsort((positions, self.blocks.cpu().numpy()))  # last key sorts first: block, then position
        chosen = np.concatenate([order[labels[order] == c][:k] for c in range(self.num_classes)])
        chosen = order[np.isin(order, chosen)]  # back to global (block, position) order
        index = torch.as_tensor(chosen, device=self.images.device)
        soft = None if self.soft_labels is None else self.soft_labels[index]
        meta = {**self.metadata, "ipc": k}
        return DistilledSet(self.images[index], self.labels[index], soft, self.blocks[index], meta)


# ---------------------------------------------------------------------------------------------- Parquet


def _fixed_list(rows: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def write_distilled(path: str | os.PathLike | Location, dset: DistilledSet) -> None:
    """Write `dset` to a Parquet file atomically; `image_shape` and `num_classes` are added to the metadata."""
    meta = dict(dset.metadata)
    shape = [int(s) for s in dset.images.shape[1:]]
    if "image_shape" in meta and [int(s) for s in meta["image_shape"]] != shape:
        raise ValueError(f"write_distilled: metadata image_shape {meta['image_shape']} != images shape {shape}")
    meta["image_shape"] = shape
    meta["num_classes"] = dset.num_classes
    try:
        header = json.dumps({**meta, "format_version": FORMAT_VERSION}, default=json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"write_distilled: metadata is not JSON-serialisable ({exc}); pass plain values") from None

    n = len(dset.labels)
    columns = {
        "image": _fixed_list(dset.images.cpu().numpy().reshape(n, -1)),
        "label": pa.array(dset.labels.cpu().numpy()),
    }
    if dset.soft_labels is not None:
        columns["soft_label"] = _fixed_list(dset.soft_labels.cpu().numpy())
    columns["block"] = pa.array(dset.blocks.cpu().numpy())
    table = pa.table(columns).replace_schema_metadata({META_KEY: header.encode("utf-8")})
    with atomic_path(path) as tmp:
        # Page checksums let our reader detect corrupted pages; readers that ignore them lose nothing. Float pixels
        # rarely repeat, so a dictionary would only add a page: keep it for the small integer columns.
        pq.write_table(table, tmp, write_page_checksum=True, use_dictionary=["label", "block"])


def _resolve(path: str | os.PathLike | Location) -> RunPath:
    path = location(path)
    return path / DISTILLED_FILE if path.is_dir() else path


def _arrow(path: RunPath) -> dict:  # how pyarrow.parquet opens a local path, or a Location by its file system
    return {"source": path.path, "filesystem": path.fs} if isinstance(path, Location) else {"source": path}


def _broken(path: RunPath, exc: BaseException) -> ArtifactError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ArtifactError(
        f"{path}: not a readable Parquet file ({first}); it is truncated or corrupt, re-run 'raydistill distill'"
    )


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _numbers(value: Any, length: int) -> bool:
    return (isinstance(value, list) and len(value) == length and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def check_metadata(path: RunPath, meta: dict) -> None:
    """The metadata comes from the file, so it is untrusted: check every key raydistill reads, with its type and
    range, before anything uses it. One ArtifactError names the key."""
    def bad(key: str, expected: str) -> ArtifactError:
        return ArtifactError(f"{path}: metadata {key} is {str(meta.get(key))[:80]!r}, expected {expected}; "
                             "the file is corrupt or was not written by raydistill")

    shape = meta.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_int(s, 1, MAX_SIDE) for s in shape)):
        raise bad("image_shape", f"[C, H, W] of integers in 1..{MAX_SIDE}")
    if "num_classes" in meta and not _int(meta["num_classes"], 1, MAX_CLASSES):
        raise bad("num_classes", f"an integer in 1..{MAX_CLASSES}")
    names = meta.get("class_names")
    if "class_names" in meta and not (isinstance(names, list) and all(isinstance(n, str) for n in names)
                                  and len(names) == meta.get("num_classes", len(names)) and 0 < len(names) <= MAX_CLASSES):
        raise bad("class_names", "a list of strings, one per class")
    if "ipc" in meta and not _int(meta["ipc"], 1, 10**9):
        raise bad("ipc", "a positive integer")
    norm = meta.get("normalisation")
    if "normalisation" in meta and not (isinstance(norm, dict) and _numbers(norm.get("mean"), shape[0])
                                 and _numbers(norm.get("std"), shape[0]) and all(v > 0 for v in norm["std"])):
        raise bad("normalisation", f"{{mean, std}} of {shape[0]} finite numbers each, std > 0")
    for key, kind, expected in (("zca", bool, "true or false"), ("config", dict, "a mapping of config fields"),
                                ("method", str, "a method name"), ("dataset", str, "a data set name"),
                                ("learned", dict, "a mapping of learnable names to values")):
        if key in meta and not isinstance(meta[key], kind):
            raise bad(key, expected)


def read_header(path: str | os.PathLike | Location) -> tuple[RunPath, pa.Schema, dict]:
    """Open and validate the schema and metadata without reading any data; returns (path, schema, metadata)."""
    try:
        path = _resolve(path)
        found = path.is_file()
    except OSError as exc:  # shared storage that cannot be reached (no network, no credentials)
        raise ArtifactError(f"{path}: cannot be reached ({one_line(exc)}); check the location and its "
                            "credentials") from None
    if not found:
        raise ArtifactError(f"{path}: no such file; run 'raydistill distill' first or check the path")
    try:
        schema = pq.read_schema(_arrow(path)["source"], filesystem=_arrow(path).get("filesystem"))
    except (pa.ArrowException, OSError) as exc:
        raise _broken(path, exc) from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ArtifactError(
            f"{path}: Parquet file without 'raydistill' metadata; not a raydistill artifact, "
            f"pass the {DISTILLED_FILE} of a run"
        )
    if len(raw) > MAX_METADATA_BYTES:
        raise ArtifactError(f"{path}: its metadata is {len(raw)} bytes, more than any raydistill artifact writes "
                            f"({MAX_METADATA_BYTES}); the file is not a raydistill artifact")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than any artifact writes
        meta = None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: the 'raydistill' metadata is not a JSON object; the file is corrupt, re-run")
    version = meta.pop("format_version", None)
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{path}: missing or invalid format_version {version!r}; the file is corrupt, re-run")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format version {version} is newer than this raydistill reads ({FORMAT_VERSION}); "
            "upgrade raydistill"
        )
    missing = [c for c in ("image", "label", "block") if c not in schema.names]
    if missing:
        raise ArtifactError(f"{path}: missing column(s) {', '.join(missing)}; the file is not a complete artifact")
    check_metadata(path, meta)
    shape = meta["image_shape"]
    image_type = schema.field("image").type
    if not pa.types.is_fixed_size_list(image_type) or image_type.list_size != math.prod(shape):
        raise ArtifactError(
            f"{path}: column image is {image_type}, expected fixed_size_list<float> of {math.prod(shape)} "
            f"values (image_shape {shape}); the file is corrupt, re-run"
        )
    if "soft_label" in schema.names:
        soft_type = schema.field("soft_label").type
        if not pa.types.is_fixed_size_list(soft_type) or soft_type.list_size != meta.get("num_classes"):
            raise ArtifactError(
                f"{path}: column soft_label is {soft_type}, expected fixed_size_list<float> of "
                f"num_classes={meta.get('num_classes')} values; the file is corrupt, re-run"
            )
    return path, schema, meta


def read_table(path: RunPath, columns: Sequence[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(**_arrow(path), columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise _broken(path, exc) from None


def read_column(path: RunPath, table: pa.Table, name: str, dtype: type) -> np.ndarray:
    """One column as a writable numpy array; fixed-size lists come back (rows, size)."""
    col = table.column(name).combine_chunks()
    nested = pa.types.is_fixed_size_list(col.type)
    values = col.flatten() if nested else col
    if col.null_count or values.null_count:
        raise ArtifactError(f"{path}: column {name} has missing values; the file is corrupt, re-run")
    try:
        out = np.array(values.to_numpy(zero_copy_only=False), dtype=dtype)  # a copy torch may own and write
    except (pa.ArrowException, ValueError, TypeError):
        raise ArtifactError(f"{path}: column {name} is {col.type}, not numeric; the file is corrupt, re-run") from None
    return out.reshape(len(col), col.type.list_size) if nested else out


def read_distilled(path: str | os.PathLike | Location) -> DistilledSet:
    """Load a distilled set from a Parquet file (or a run directory holding one), validating it on the way.

    Raises ArtifactError for a missing, truncated, foreign, too-new or inconsistent file. Never unpickles.
    """
    path, schema, meta = read_header(path)
    table = read_table(path)
    n = table.num_rows
    images = read_column(path, table, "image", np.float32).reshape(n, *meta["image_shape"])
    labels = read_column(path, table, "label", np.int64)
    blocks = read_column(path, table, "block", np.int32)
    soft = read_column(path, table, "soft_label", np.float32) if "soft_label" in schema.names else None
    soft_t = None if soft is None else torch.from_numpy(soft)
    try:
        return DistilledSet(torch.from_numpy(images), torch.from_numpy(labels), soft_t, torch.from_numpy(blocks), meta)
    except ValueError as exc:
        raise ArtifactError(f"{path}: inconsistent contents ({exc}); the file is corrupt, re-run") from None


# ---------------------------------------------------------------------------------------------- ZCA


def write_zca(run_dir: str | os.PathLike | Location, arrays: dict[str, Any]) -> None:
    """Store the ZCA transform's arrays in RUN_DIR/zca.npz atomically (numeric arrays only, so no pickling)."""
    plain = {}
    for name, value in arrays.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.dtype.hasobject:
            raise ValueError(f"write_zca: array {name!r} has dtype object; pass numeric arrays")
        plain[name] = arr
    buf = io.BytesIO()
    np.savez(buf, **plain)
    atomic_write_bytes(location(run_dir) / ZCA_FILE, buf.getvalue())


def read_zca(run_dir: str | os.PathLike | Location) -> dict[str, np.ndarray] | None:
    """The arrays saved by `write_zca`, or None when the run used no ZCA (no zca.npz). Never unpickles."""
    path = location(run_dir) / ZCA_FILE
    if not path.is_file():
        return None
    try:
        npz = np.load(io.BytesIO(path.read_bytes()) if isinstance(path, Location) else path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: unreadable ZCA transform ({exc}); the file is corrupt, re-run") from None
