"""Opening a location given as a local path or a URI: the project's one URI opener (data roots, run directories)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from raydistill.config import ConfigError


def open_root(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as file:///data/x or s3://bucket/x."""
    if "://" in root:
        try:
            return pafs.FileSystem.from_uri(root)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise ConfigError(f"{root}: not a location pyarrow can open ({exc}); give a local path or a URI "
                              "such as file:///data/set or s3://bucket/set") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))
