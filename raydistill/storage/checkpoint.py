"""Crash-safe, pickle-free checkpoints of a run's state.

A checkpoint is one file `ckpt-{step:08d}.rdck`: a first text line

    RDCK 1 sha256=<64 hex digits of the payload> bytes=<payload length>

followed by the payload, an ordinary `.npz` archive (readable with `np.load(..., allow_pickle=False)` once the line
is cut off) holding the arrays plus a `__meta__` entry: the UTF-8 JSON of a metadata dict as a uint8 array. The
header makes a truncated or bit-flipped file detectable before anything is parsed. Files are written atomically
(temp file, fsync, os.replace; on shared storage the store publishes a finished file in one step), so a crash leaves
the previous checkpoint intact and a partial file never carries a checkpoint's name. Loading never unpickles.
The folder may be a local path or a run location on shared storage (raydistill.storage.store: file://, s3://, ...).

Typical use with a state dict of tensors and numbers (e.g. `MetaOptimizer.state_dict()`):

    arrays, meta = state_to_arrays(opt.state_dict())
    save_checkpoint(run_dir / "checkpoints", step, arrays, meta)
    ...
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is not None:
        path, arrays, meta = found
        opt.load_state_dict(arrays_to_state(arrays, meta))
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
import zipfile
from typing import Any

import numpy as np
import torch

from raydistill.storage.atomic import atomic_path
from raydistill.storage.store import Location, RunPath, location, one_line

FORMAT_VERSION = 1
SUFFIX = ".rdck"
META_KEY = "__meta__"
_MAGIC = b"RDCK"
_HEADER_MAX = 256  # the real header is ~100 bytes; a longer first line is not ours
_HEADER_RE = re.compile(rb"RDCK (\d+) sha256=([0-9a-f]{64}) bytes=(\d+)\n")
# {step:08d} gives at least 8 digits; temp files (".ckpt-....rdck.XXXX.tmp") and other names do not match.
_NAME_RE = re.compile(r"ckpt-(\d{8,})\.rdck")
# Fixed zip timestamps: the same state always gives the same bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file, the problem and the fix."""


class CheckpointWarning(UserWarning):
    """A newer checkpoint was unusable and an older good one was loaded instead."""


def checkpoint_path(folder: str | os.PathLike | Location, step: int) -> RunPath:
    """The file name `save_checkpoint` uses for `step` in `folder`."""
    return location(folder) / f"ckpt-{step:08d}{SUFFIX}"


# ---------------------------------------------------------------------------------------------- writing


def _payload(arrays: dict[str, np.ndarray], meta: dict) -> io.BytesIO:
    """The npz bytes: every array as `name.npy`, plus the JSON of `meta` under `__meta__`."""
    try:
        meta_json = json.dumps(meta, allow_nan=True)  # NaN / inf stay exact; Python's json reads them back
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_checkpoint: meta is not JSON-serialisable ({exc}); pass plain values") from None
    entries = {**arrays, META_KEY: np.frombuffer(meta_json.encode("utf-8"), dtype=np.uint8)}
    buf = io.BytesIO()
    # Written entry by entry rather than with np.savez, whose own keywords (`file`, `allow_pickle`) would clash
    # with array names; the result is the same uncompressed npz format np.load reads.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in entries.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, array, allow_pickle=False)
    return buf


def _check_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, array in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"save_checkpoint: array name {name!r} must be a non-empty string")
        if name == META_KEY:
            raise ValueError(f"save_checkpoint: array name {META_KEY!r} is reserved for the metadata; rename it")
        array = np.asarray(array)
        if array.dtype.hasobject:
            # Object arrays can only be stored by pickling, and loading them would mean unpickling.
            raise ValueError(
                f"save_checkpoint: array {name!r} has object dtype, which would need pickle; "
                "store numbers in a numeric array and text in meta"
            )
        out[name] = array
    return out


def save_checkpoint(
    folder: str | os.PathLike | Location, step: int, arrays: dict[str, np.ndarray], meta: dict, keep: int = 3
) -> RunPath:
    """Write `folder/ckpt-{step:08d}.rdck` atomically, then delete all but the newest `keep` checkpoints.

    arrays: named numeric numpy arrays (object dtype is refused: it would pickle); meta: a JSON-serialisable dict.
    The folder is created if needed. The file just written is never deleted, even when older-numbered than the
    `keep` newest (a run restarted from an earlier step). Returns the path written.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an integer >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_checkpoint: keep must be an integer >= 1, got {keep!r}")
    if not isinstance(meta, dict):
        raise ValueError(f"save_checkpoint: meta must be a dict, got {type(meta).__name__}")
    payload = _payload(_check_arrays(arrays), meta).getbuffer()
    header = f"RDCK {FORMAT_VERSION} sha256={hashlib.sha256(payload).hexdigest()} bytes={len(payload)}\n"

    path = checkpoint_path(folder, int(step))
    with atomic_path(path) as tmp:  # creates the folder; fsyncs and moves only if the block succeeds
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(payload)  # two writes rather than header + payload: no second copy of a large payload

    for old in list_checkpoints(folder)[keep:]:
        if old != path:
            old.unlink(missing_ok=True)  # another process may be pruning the same folder
    return path


# ---------------------------------------------------------------------------------------------- reading


def _corrupt(path: RunPath, problem: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {problem}; delete it and resume from an earlier checkpoint (latest_checkpoint does so)"
    )


def _read_raw(path: RunPath) -> tuple[bytes, bytes]:
    """(first line, at most _HEADER_MAX bytes; the rest) of a checkpoint file."""
    if isinstance(path, Location):
        data = path.read_bytes()
        end = data.find(b"\n", 0, _HEADER_MAX)
        cut = _HEADER_MAX if end < 0 else end + 1
        return data[:cut], data[cut:]
    with open(path, "rb") as fh:
        return fh.readline(_HEADER_MAX), fh.read()


def _read_verified(path: RunPath) -> bytes:
    """The payload of `path` after checking header, length and checksum."""
    try:
        first, payload = _read_raw(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file; check the path or use latest_checkpoint") from None
    except OSError as exc:
        reason = exc.strerror or one_line(exc)
        raise CheckpointError(f"{path}: cannot be read ({reason}); check the path and its permissions") from None

    if not first.startswith(_MAGIC):
        if not first:
            raise _corrupt(path, "empty file (an interrupted write)")
        raise CheckpointError(f"{path}: not a raydistill checkpoint (no RDCK header); pass a ckpt-*.rdck file")
    if not first.endswith(b"\n"):
        raise _corrupt(path, "header line is cut off (an interrupted write)")
    version = re.match(rb"RDCK (\d+) ", first)
    if version and int(version[1]) != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {int(version[1])} is not supported "
            f"(this raydistill reads version {FORMAT_VERSION}); use the raydistill that wrote it"
        )
    match = _HEADER_RE.fullmatch(first)
    if match is None:
        raise _corrupt(path, "malformed RDCK header line")
    digest, size = match[2].decode("ascii"), int(match[3])
    if len(payload) < size:
        raise _corrupt(path, f"truncated: {len(payload)} of {size} payload bytes (an interrupted write or copy)")
    if len(payload) > size:
        raise _corrupt(path, f"{len(payload) - size} unexpected bytes after the {size}-byte payload")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise _corrupt(path, "checksum mismatch, the payload is corrupt")
    return payload


def load_checkpoint(path: str | os.PathLike | Location) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify one checkpoint file; returns (arrays, meta).

    Header, byte count and SHA-256 are checked before the npz is parsed, and it is parsed with
    `allow_pickle=False`. Raises CheckpointError (one line naming the file) for a missing, foreign, truncated,
    corrupt or unreadable file.
    """
    path = location(path)
    payload = _read_verified(path)
    if not payload.startswith(b"PK\x03\x04"):  # keeps np.load on its zip path (no .npy / pickle sniffing)
        raise _corrupt(path, "payload is not an npz archive")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _corrupt(path, f"unreadable npz payload ({first})") from None

    raw = arrays.pop(META_KEY, None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise _corrupt(path, f"no valid {META_KEY} entry")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise _corrupt(path, f"{META_KEY} is not a JSON object")
    return arrays, meta


def checkpoint_step(path: str | os.PathLike | Location) -> int:
    """The step a checkpoint file name stands for (`ckpt-00000040.rdck` -> 40)."""
    match = _NAME_RE.fullmatch(location(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint file name (ckpt-<step>{SUFFIX})")
    return int(match[1])


def list_checkpoints(folder: str | os.PathLike | Location) -> list[RunPath]:
    """Checkpoint files in `folder`, newest (highest step) first; [] when the folder is missing.

    Only names `ckpt-<step>.rdck` count: temp files from interrupted writes and other files are ignored.
    """
    folder = location(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NAME_RE.fullmatch(entry.name)
        if match and entry.is_file():
            found.append((int(match[1]), entry.name, entry))
    return [entry for _, _, entry in sorted(found, reverse=True)]


def latest_checkpoint(folder: str | os.PathLike | Location) -> tuple[RunPath, dict[str, np.ndarray], dict] | None:
    """The newest checkpoint in `folder` that loads, as (path, arrays, meta); None when there is none at all.

    Unusable newer checkpoints (truncated, corrupt) are skipped with a CheckpointWarning each. Raises
    CheckpointError when checkpoints exist but none of them loads.
    """
    candidates = list_checkpoints(folder)
    if not candidates:
        return None
    failures: list[CheckpointError] = []
    for path in candidates:
        try:
            arrays, meta = load_checkpoint(path)
        except CheckpointError as exc:
            failures.append(exc)
            continue
        # Warn only now, so the message can name the checkpoint actually used.
        for exc in failures:
            warnings.warn(
                f"skipping unusable checkpoint ({exc}); using the previous good one, {path.name}",
                CheckpointWarning,
                stacklevel=2,
            )
        return path, arrays, meta
    raise CheckpointError(
        f"{folder}: none of the {len(candidates)} checkpoints loads (newest: {failures[0]}); "
        "remove the bad ckpt-*.rdck files or start a new run in a fresh directory"
    )


# ---------------------------------------------------------------------------------------------- state dicts


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def state_to_arrays(state: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Split a flat state dict into (arrays, meta) for `save_checkpoint`.

    Tensors become numpy arrays of the same dtype and shape (detached, copied to the CPU); None, bools, ints,
    floats, strings and lists / dicts of those go to meta unchanged (tuples come back as lists). Anything else
    (nested tensors, numpy values, objects) raises ValueError.
    """
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"state_to_arrays: key {key!r} must be a string")
        if isinstance(value, torch.Tensor):
            try:
                arrays[key] = value.detach().cpu().numpy()
            except TypeError:  # bfloat16 and other dtypes numpy lacks
                raise ValueError(
                    f"state_to_arrays: tensor {key!r} has dtype {value.dtype}, which numpy cannot hold; "
                    "convert it (e.g. .float()) before checkpointing"
                ) from None
        elif _is_plain(value):
            meta[key] = value
        else:
            raise ValueError(
                f"state_to_arrays: {key!r} is a {type(value).__name__}; "
                "use a torch tensor or plain None / bool / int / float / str / list values"
            )
    return arrays, meta


def arrays_to_state(arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """Join (arrays, meta) from `load_checkpoint` back into a state dict: arrays become CPU torch tensors.

    Inverse of `state_to_arrays`; the tensors share memory with writable arrays. Every key of meta is returned
    as-is, so metadata the caller added beside the state comes back too (load_state_dict methods ignore it).
    """
    clash = sorted(set(arrays) & set(meta))
    if clash:
        raise ValueError(f"arrays_to_state: keys {clash} are both arrays and meta; rename the meta entries")
    state: dict = {}
    for key, array in arrays.items():
        array = np.asarray(array)
        try:
            state[key] = torch.from_numpy(array if array.flags.writeable else array.copy())
        except TypeError:
            message = f"arrays_to_state: array {key!r} has dtype {array.dtype}, which torch cannot hold"
            raise ValueError(message) from None
    state.update(meta)
    return state
