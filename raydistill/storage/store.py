"""Where a run lives: a local folder, or a folder on shared storage named by a URI.

`location(target)` turns what the user gave (`--out`, `--resume`, RUN_DIR) into one of two things:

- a `pathlib.Path` for a local path or a `file://` URI: `file:///abs/path` is the same folder as `/abs/path` in every
  respect (a local file system, shared across nodes or not, is written with os-level atomic moves and fsync);
- a `Location` for any other URI: `s3://`, `gs://`, `hdfs://`, `abfs://` through pyarrow.fs, any other scheme an
  installed fsspec package knows (e.g. `memory://`, fsspec's in-process file system, used by the tests).

`Location` answers the `pathlib.Path` calls a run directory needs (`/`, name, parent, exists, is_file, is_dir, iterdir,
read_bytes, read_text, mkdir, unlink), so code written for a Path reads and lists either. Writes go through
raydistill.storage.atomic, which sends a `Location` here: `put_file` / `write_atomic` publish a finished file in one step
(one PUT on an object store, where an object appears whole or not at all; elsewhere a temporary name in the same
folder, then a move), and `append_text` reads and rewrites, since object stores cannot append.

A Location is deliberately not os.PathLike: a stray `open(run)` or `Path(run)` fails loudly instead of writing into a
local folder of the same name. What only writes local files (TensorBoard's event files) gets `local_dir(run)`, a
local folder that `publish_local_dir(run)` copies into the run location at the end of a session.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from raydistill.config import ConfigError
from raydistill.filesystems import open_root

# Schemes pyarrow.fs opens itself (FileSystem.from_uri); any other goes to fsspec.
PYARROW_SCHEMES = {"file", "local", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}
# Stores where one PUT is atomic and there is no rename: a finished file is written in one request.
OBJECT_STORES = {"s3", "gcs", "abfs", "py::fsspec+s3", "py::fsspec+s3a", "py::fsspec+gs", "py::fsspec+gcs",
                 "py::fsspec+az", "py::fsspec+abfs", "py::fsspec+abfss"}
# File systems that live inside one process: a Ray actor elsewhere would not see what the driver wrote.
PROCESS_LOCAL = {"memory"}
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (pyarrow's and fsspec's can run over several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class Location:
    """A file or folder on a non-local file system: (pyarrow FileSystem, path inside it, the URI shown to users).

    A query of the URI (`s3://bucket/run?endpoint_override=host:9000`) is kept apart: names join onto the URI's
    path, and `str()` puts the query back at the end, so the text of any file opens the same file system again.
    """

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str, scheme: str, query: str = ""):
        self.fs, self.path, self.scheme, self.query = fs, path.rstrip("/") or "/", scheme, query
        self.uri = uri.rstrip("/")  # without the query

    # ------------------------------------------------------------------------------------------ names

    def __truediv__(self, name: str) -> Location:
        name = os.fspath(name)
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"{self}: {name!r} is not a relative name inside it")
        return Location(self.fs, f"{self.path}/{name}", f"{self.uri}/{name}", self.scheme, self.query)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        """The folder holding this one; itself at the top of the URI (a bucket, memory://)."""
        tail = "/" + self.name
        uri, path = self.uri[: -len(tail)], self.path[: -len(tail)]
        if not self.uri.endswith(tail) or not self.path.endswith(tail) or uri.endswith((":", ":/", "://")):
            return self
        return Location(self.fs, path or "/", uri, self.scheme, self.query)

    @property
    def _folder(self) -> str:
        """The file system path of the folder this file is in."""
        return self.path.rsplit("/", 1)[0] or "/"

    def __str__(self) -> str:
        return f"{self.uri}?{self.query}" if self.query else self.uri

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.uri, self.path) == (other.uri, other.path)

    def __hash__(self) -> int:
        return hash((self.uri, self.path))

    # ------------------------------------------------------------------------------------------ reading

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def iterdir(self) -> Iterator[Location]:
        """The entries directly inside this folder (none when it is missing)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            yield self / info.base_name

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as fh:
            return fh.read()

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    # ------------------------------------------------------------------------------------------ writing

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        if not exist_ok and self.exists():
            raise FileExistsError(17, "File exists", str(self))
        self.fs.create_dir(self.path, recursive=parents)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    @property
    def object_store(self) -> bool:
        return self.fs.type_name in OBJECT_STORES

    def write_atomic(self, data: bytes) -> None:
        """Replace this file with `data` so that readers see the old file or the new one, never a part."""
        self.fs.create_dir(self._folder, recursive=True)
        if self.object_store:  # one PUT: the object appears whole, when the request completes
            with self.fs.open_output_stream(self.path) as fh:
                fh.write(data)
            return
        tmp = f"{self._folder.rstrip('/')}/.{self.name}.{uuid.uuid4().hex}.tmp"  # no listing of raydistill's matches
        try:
            with self.fs.open_output_stream(tmp) as fh:
                fh.write(data)
            self.fs.move(tmp, self.path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.delete_file(tmp)
            raise

    def put_file(self, local: Path) -> None:
        """Publish a finished local file here atomically (see write_atomic)."""
        self.write_atomic(Path(local).read_bytes())

    def append_text(self, text: str) -> None:
        """Append by reading and rewriting the file: object stores cannot append, and the rewrite is atomic."""
        try:
            old = self.read_bytes()
        except FileNotFoundError:
            old = b""
        self.write_atomic(old + text.encode("utf-8"))


RunPath = Path | Location


def is_remote(target: object) -> bool:
    return isinstance(target, Location)


def _scheme(text: str) -> str | None:
    match = _SCHEME_RE.match(text)
    return match[1].lower() if match else None


def location(target: str | os.PathLike | Location) -> RunPath:
    """A local path or file:// URI as a Path; any other URI as a Location. ConfigError (one line) when the URI cannot
    be opened: an unknown scheme, a file system this pyarrow lacks, a package fsspec needs, no credentials."""
    if isinstance(target, Location):
        return target
    if isinstance(target, os.PathLike):
        return Path(target)
    text = str(target)
    if "://" not in text:
        return Path(text)
    scheme = _scheme(text)
    if scheme is None or not text.split("://", 1)[1].strip("/"):
        raise ConfigError(f"{text}: not a path or a URI naming a folder; give a local path or a URI such as "
                          "s3://bucket/run")
    if scheme == "file":
        _, path = _open(text, open_root)
        return Path(path)
    if scheme in PYARROW_SCHEMES:
        fs, path = _open(text, open_root)
    else:
        fs, path = _open(text, _fsspec_root)
    base, _, query = text.partition("?")
    return Location(fs, path, base, scheme, query)


def _open(text: str, opener) -> tuple[pafs.FileSystem, str]:
    try:
        return opener(text)
    except ConfigError as exc:
        raise ConfigError(one_line(exc)) from None


def _fsspec_root(uri: str) -> tuple[pafs.FileSystem, str]:
    """A URI pyarrow does not know, through fsspec (wrapped so that the rest of the code sees a pyarrow FileSystem)."""
    scheme = _scheme(uri)
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise ConfigError(f"{uri}: the {scheme}:// scheme needs fsspec (pip install fsspec), or use a local path, "
                          "file://, s3://, gs://, hdfs:// or abfs://") from None
    if scheme not in fsspec.available_protocols():
        raise ConfigError(f"{uri}: unknown URI scheme {scheme}://; use a local path, file://, s3://, gs://, hdfs://, "
                          "abfs:// or a scheme of an installed fsspec package")
    try:
        fs, path = url_to_fs(uri)
    except ImportError as exc:
        raise ConfigError(f"{uri}: the {scheme}:// scheme needs a package that is not installed ({one_line(exc)}); "
                          "install it or use another location") from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{uri}: cannot open this location ({one_line(exc)}); check the URI and its "
                          "credentials") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def check_scheme(text: str, what: str) -> None:
    """A URI's scheme is one pyarrow or an installed fsspec package opens, and not one process's own (ConfigError);
    nothing is opened, so nothing waits on the network."""
    scheme = _scheme(text)
    if scheme is None or scheme in PYARROW_SCHEMES:
        return
    try:
        import fsspec

        known = scheme in fsspec.available_protocols()
    except ImportError:
        known = False
    if not known:
        raise ConfigError(f"{what}: {text} has the unknown URI scheme {scheme}://; use a local path, file://, s3://, "
                          "gs://, hdfs://, abfs:// or a scheme of an installed fsspec package")
    if scheme in PROCESS_LOCAL:
        raise ConfigError(f"{what}: {text} lives inside one process only, where Ray's workers cannot see it; give a "
                          "path or a shared URI (file://, s3://, gs://, ...)")


def check_shared(run: RunPath, what: str = "--out") -> None:
    """Refuse a file system that lives in one process where other processes (Ray actors) must see the run."""
    if isinstance(run, Location) and run.scheme in PROCESS_LOCAL:
        raise ConfigError(f"{what}: {run} lives inside this process only, where Ray's actors cannot see it; give a "
                          "path or a shared URI (file://, s3://, gs://, ...), or run with --in-process")


# ---------------------------------------------------------------------------------------------- local side folder


def local_dir(run: RunPath) -> Path:
    """A local folder for what can only be written as local files (TensorBoard's event files).

    The run directory itself when it is local; for a Location, a folder under the temp directory named after the
    URI, which `publish_local_dir` copies into the run location.
    """
    if isinstance(run, Path):
        return run
    digest = hashlib.sha256(run.uri.encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "raydistill-local" / f"{run.name}-{digest}"


def publish_local_dir(run: RunPath) -> None:
    """Copy the local side folder of a Location into it (each file atomically), then remove the side folder.

    Never raises: the side folder holds only TensorBoard's curves (metrics.jsonl in the run has every step), so a
    copy that fails is reported in one line and the folder is kept for the next session to copy.
    """
    if isinstance(run, Path):
        return
    folder = local_dir(run)
    if not folder.is_dir():
        return
    try:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                (run / path.relative_to(folder).as_posix()).put_file(path)
    except OSError as exc:
        print(f"raydistill: warning: could not copy {folder} into {run} ({one_line(exc)}); the files stay there",
              file=sys.stderr)
        return
    shutil.rmtree(folder, ignore_errors=True)
