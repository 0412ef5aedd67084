"""Building a config section from plain data and the checks every section's validator uses.

Shared by the method-neutral config and by each method's own section, so every field error reads the same way:
one line naming the field, the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from typing import Any

from raydistill.config.errors import ConfigError


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """An instance of dataclass `cls` from a mapping; unknown keys and wrongly typed values are ConfigErrors."""
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown field; valid fields here: {', '.join(sorted(names))}")
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in raw.items()}
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, name + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # --set eval.archs=convnet,vgg11
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {value}; NaN and infinity are never valid settings")
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def choice(value: str, options: Iterable[str], name: str) -> None:
    options = list(options)
    if value not in options:
        raise ConfigError(f"{name}: unknown value {value!r}; choose one of {', '.join(options)}")


def positive(value: float, name: str) -> None:
    """> 0 and finite: NaN compares False with everything, so `value <= 0` alone would let it through."""
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: must be a finite number > 0, got {value}")


def at_least(value: float, low: float, name: str) -> None:
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{name}: must be a finite number >= {low:g}, got {value}")


def in_range(value: float, low: float, high: float, name: str, high_open: bool = True, why: str = "") -> None:
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{name}: must be in [{low:g}, {high:g}{bracket}{why}, got {value}")


# The `trackers:` entries of a run config or sweep file (raydistill.watch.trackers logs to them): name -> options.
TRACKER_OPTIONS: dict[str, tuple[str, ...]] = {
    "tensorboard": (),
    "mlflow": ("tracking_uri", "experiment_name", "tags", "save_artifact", "log_params_on_trial_end"),
    "wandb": ("project", "group", "entity", "mode", "dir", "tags", "notes", "log_config", "excludes"),
}
WANDB_MODES = ("online", "offline", "disabled")


def parse_trackers(raw: Any, key: str = "trackers") -> list[dict]:
    """The checked `trackers:` list (of a config or sweep file) as plain mappings {name, **options}."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: expected a list, e.g. [tensorboard, {{name: wandb, mode: offline}}]")
    out, seen = [], set()
    for index, entry in enumerate(raw):
        where = f"{key}[{index}]"
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or entry.get("name") not in TRACKER_OPTIONS:
            raise ConfigError(f"{where}: expected one of {', '.join(TRACKER_OPTIONS)} (or a mapping with name: and its "
                              f"options), got {entry!r}")
        name = entry["name"]
        options = TRACKER_OPTIONS[name]
        unknown = sorted(set(entry) - {"name", *options})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: not an option of {name}; valid: "
                              f"{', '.join(options) or 'none'}")
        if name == "wandb" and entry.get("mode", "online") not in WANDB_MODES:
            raise ConfigError(f"{where}.mode: expected one of {', '.join(WANDB_MODES)}, got {entry['mode']!r}")
        if name in seen:
            raise ConfigError(f"{where}: {name} is named twice; keep one entry")
        seen.add(name)
        out.append(dict(entry))
    return out
