"""Building a config: presets by name or path, YAML, dotted `key=value` overrides, and plain dicts (Tune samples).

`load_config` and `config_from_dict` validate once, at the edge, and raise ConfigError with a one-line message that
names the field and the fix; the rest of the code trusts the object. `config_to_dict` is their inverse: the method's
section is written back under the method's name, so a saved config.yaml loads again as it was.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from raydistill.config.checks import build_section
from raydistill.config.errors import ConfigError
from raydistill.config.schema import DistillConfig
from raydistill.config.validate import validate
from raydistill.methods.registry import get_method, method_names

PRESETS = resources.files("raydistill.config") / "presets"


def config_to_dict(cfg: Any) -> dict:
    """Plain data of a config (or of one section); the method's section sits under the method's name."""
    data = dataclasses.asdict(cfg)
    if isinstance(cfg, DistillConfig):
        section = data.pop("method_config")
        data[get_method(cfg.method).name] = section
    return data


def config_from_dict(raw: dict, check_paths: bool = True) -> DistillConfig:
    """Build and validate a config from plain data (YAML, --set overrides, Tune samples)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of fields, got {type(raw).__name__} {raw!r}")
    data = dict(raw)
    name = data.get("method", "ratbptt")
    if not isinstance(name, str):
        raise ConfigError(f"method: expected a method name, got {name!r}; choose one of {', '.join(method_names())}")
    method = get_method(name)
    section = data.pop(method.name, None)
    for other in method_names():
        if other in data and other != method.name:
            raise ConfigError(f"{other}: settings of method {other}, but method is {name}; drop the section "
                              f"or set method={other}")
    if "method_config" in data:
        raise ConfigError(f"method_config: unknown field; put the method's settings under {method.name}:")
    cfg = build_section(DistillConfig, data, "")
    cfg.method_config = build_section(method.config_cls, section, f"{method.name}.")
    validate(cfg, check_paths=check_paths)
    return cfg


# ---------------------------------------------------------------------------------------------- presets and YAML


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def read_preset(path_or_name: str) -> tuple[dict, str]:
    """A preset by name (shipped in the package) or by path; returns (data, where it came from)."""
    packaged = PRESETS / f"{path_or_name}.yaml"
    if os.sep not in path_or_name and not path_or_name.endswith((".yaml", ".yml")) and packaged.is_file():
        text, where = packaged.read_text(), f"preset {path_or_name}"
    elif Path(path_or_name).is_file():
        text, where = Path(path_or_name).read_text(), path_or_name
    else:
        raise ConfigError(
            f"preset: {path_or_name!r} is neither a shipped preset nor a YAML file; "
            f"see 'raydistill presets' ({', '.join(preset_names())})"
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config fields at the top level")
    return data, where


def parse_override(text: str) -> tuple[str, Any]:
    """'ratbptt.window=40' -> ('ratbptt.window', 40); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set ratbptt.window=40")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set `a.b.c` in nested mappings, creating the groups on the way; the one owner of dotted keys."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a group of fields")
        node = child
    node[parts[-1]] = value


def merge_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of `data` with each `key.path=value` set (nested mappings created as needed)."""
    out = _deepcopy(data)
    for text in overrides:
        set_dotted(out, *parse_override(text))
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def load_config(preset: str | None = None, overrides: Iterable[str] = (), check_paths: bool = True) -> DistillConfig:
    """A validated config from a preset name or YAML path plus `key=value` overrides."""
    data: dict = {}
    if preset is not None:
        data, _ = read_preset(preset)
    return config_from_dict(merge_overrides(data, overrides), check_paths=check_paths)
