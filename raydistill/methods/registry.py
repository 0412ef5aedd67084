"""The method registry: a method is found by its registered name or by an import path.

Built-in methods are listed here by import path, so looking one up imports only that method. A method shipped in
another package registers itself under the `raydistill.methods` entry-point group; a method anywhere on the Python
path is named directly as "package.module:Class". Every process (workers included) resolves the name the same way,
so the config carries only the name.
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
}
ENTRY_POINT_GROUP = "raydistill.methods"
_cache: dict[str, Method] = {}


def method_names() -> list[str]:
    """Built-in and installed (entry-point) method names."""
    return sorted({*BUILTIN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


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
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"method: cannot import {path!r} ({exc}); install the package that provides it "
                              "on every node") from None
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"method: {path!r} is not a raydistill.methods.Method subclass")
        _cache[name] = cls()
    return _cache[name]
