"""The method registry: a method is found by its registered name or by an import path.

Built-in methods are listed here by import path, so looking one up imports only that method. A method shipped in
another package registers itself under the `raydistill.methods` entry-point group; a method anywhere on the Python
path is named directly as "package.module:Class". Every process (workers included) resolves the name the same way,
so the config carries only the name.

Importing a module runs its code, so an import path is followed only where the user named it: on the command line
or in a preset file they passed (`allow_import_path`). A file raydistill wrote and reads back (a run's config.yaml,
an artifact's metadata) may name a built-in or installed method only (`check_file_method`): a crafted file cannot
make raydistill import anything.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from raydistill.config.errors import ConfigError
from raydistill.methods.base import Method

BUILTIN = {
    "ratbptt": "raydistill.methods.ratbptt.method:RatBptt",
    "dm": "raydistill.methods.dm.method:DistributionMatching",
    "cafe": "raydistill.methods.cafe.method:Cafe",
    "dc": "raydistill.methods.dc.method:GradientMatching",
    "dsa": "raydistill.methods.dc.method:SiameseGradientMatching",
    "frepo": "raydistill.methods.krr.frepo:Frepo",
    "rfad": "raydistill.methods.krr.rfad:Rfad",
    "kip": "raydistill.methods.krr.kip:Kip",
}
ENTRY_POINT_GROUP = "raydistill.methods"
_cache: dict[str, Method] = {}
_named: set[str] = set()  # import paths the user named in this process (command line, a preset file passed)


def method_names() -> list[str]:
    """Built-in and installed (entry-point) method names."""
    return sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def allow_import_path(name: object) -> None:
    """`name` was named by the user (on the command line, in a preset file they passed): a file may name it too."""
    if isinstance(name, str) and ":" in name:
        _named.add(name)


def check_file_method(name: object, source: str) -> None:
    """Refuse a method that a file raydistill reads back names by import path, unless the user named it too."""
    if not isinstance(name, str) or ":" not in name or name in _named or name in method_names():
        return
    raise ConfigError(f"method: {source} names {name!r}, an import path, and raydistill imports code only where you "
                      "name it; install the method under the raydistill.methods entry-point group, or name it on the "
                      f"command line (--set method={name} with --resume, --method {name} with eval)")


def _import_path(name: str) -> str:
    if name in BUILTIN:
        return BUILTIN[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.value
    if ":" in name:
        return name
    raise ConfigError(f"method: unknown method {name!r}; choose one of {', '.join(method_names())} "
                      "or name one as package.module:Class")


def get_method(name: str) -> Method:
    """The method instance for `name` (cached per process)."""
    if name not in _cache:
        path = _import_path(name)
        module_name, _, attr = path.partition(":")
        if not all(part.isidentifier() for part in module_name.split(".")) or not attr.isidentifier():
            raise ConfigError(f"method: {path!r} is not an import path; write it as package.module:Class")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"method: cannot import {path!r} ({exc}); install the package that provides it "
                              "on every node") from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"method: {path!r} is not a raydistill.methods.Method subclass")
        missing = [a for a in ("name", "config_cls") if a not in vars(cls) and not any(
            a in vars(base) for base in cls.__mro__[1:] if base is not Method)]
        if missing:
            raise ConfigError(f"method: {path!r} does not declare {' and '.join(missing)}; name a concrete method "
                              "(a Method subclass that sets name and config_cls)")
        _cache[name] = cls()
    return _cache[name]
