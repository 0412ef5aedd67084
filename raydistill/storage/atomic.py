"""Crash-safe file writes, to local paths and to run locations on shared storage (raydistill.storage.store).

Every file a run leaves behind is written to a temporary file in the same directory, flushed, fsynced and then
moved over the target with `os.replace` (atomic on POSIX and Windows). A crash at any moment leaves either the old
good file or the new good file, never half of one, and the temporary file is removed when anything fails. A target
that is a `store.Location` (a URI) is written to a local temporary file first and then published in one step by
the store (one PUT on an object store, a temporary name and a move elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raydistill.storage.store import Location, location

# mkstemp creates files 0600; give finished files the mode a plain open() would have. Reading the umask means
# setting it, so do it once at import rather than on every write (os.umask is process-wide).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` hook for the values runs produce: numpy / torch scalars and arrays, paths."""
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor, without importing torch here
        return obj.detach().cpu().tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and numpy scalars
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} {obj!r} is not JSON serialisable")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Best effort: not every platform / file system lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike | Location) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and move it over `path`.

    For writers that want a file name rather than bytes (e.g. `pyarrow.parquet.write_table`). If the block or the
    move raises, the temporary file is deleted and `path` is left as it was. For a Location the temporary file is
    local and the store publishes it when the block succeeds.
    """
    target = location(path)
    if isinstance(target, Location):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp_name)
            target.put_file(Path(tmp_name))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as fh:  # the writer may have closed without fsync; make the bytes durable first
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike | Location, data: bytes) -> None:
    """Replace `path` with `data` atomically (temp file in the same directory, fsync, os.replace)."""
    target = location(path)
    if isinstance(target, Location):
        target.write_atomic(data)
        return
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)  # atomic_path fsyncs before the move


def atomic_write_text(path: str | os.PathLike | Location, text: str) -> None:
    """Replace `path` with UTF-8 `text` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike | Location, obj: Any) -> None:
    """Replace `path` with `obj` as indented JSON atomically (numpy / torch values become plain numbers / lists)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def append_jsonl(path: str | os.PathLike | Location, obj: Any) -> None:
    """Append `obj` as one JSON line to `path` and flush it.

    Not atomic: a crash can leave a partial last line, so readers should skip a last line that does not parse
    (`summarise` does). Not fsynced either: metrics are appended every step and are cheap to lose. A Location (which
    cannot append) is read and rewritten atomically instead.
    """
    line = json.dumps(obj, default=json_default)
    target = location(path)
    if isinstance(target, Location):
        target.append_text(line + "\n")
        return
    with open(target, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
