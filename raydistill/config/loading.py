"""Reading a config: presets by name or path, YAML, dotted `key=value` overrides, and building the typed object.

Everything here is plain data and the schema: which method a config names, and the method's own section class, come
from the caller. The one place that builds a checked config with the registries is raydistill.setup.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from raydistill.config.checks import build_section, parse_trackers
from raydistill.config.errors import ConfigError
from raydistill.config.schema import DistillConfig

PRESETS = resources.files("raydistill.config") / "presets"


def build_config(raw: dict, section_name: str, section_cls: type, other_sections: Iterable[str] = ()) -> DistillConfig:
    """The typed config of plain data whose method keeps its settings under `section_name` (as `section_cls`).

    `other_sections` are the other methods' names: their sections are errors here. Tracker names become their
    mappings ({name, **options}); every other field is built as given. Nothing here checks values (validate does).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of fields, got {type(raw).__name__} {raw!r}")
    data = dict(raw)
    section = data.pop(section_name, None)
    for other in other_sections:
        if other in data and other != section_name:
            raise ConfigError(f"{other}: settings of method {other}, but method is {data.get('method', 'ratbptt')}; "
                              f"drop the section or set method={other}")
    if "method_config" in data:
        raise ConfigError(f"method_config: unknown field; put the method's settings under {section_name}:")
    cfg = build_section(DistillConfig, data, "")
    cfg.method_config = build_section(section_cls, section, f"{section_name}.")
    cfg.trackers = parse_trackers(cfg.trackers)
    return cfg


def method_name(raw: Any) -> str:
    """The method a config names (`ratbptt` when it names none)."""
    name = raw.get("method", "ratbptt") if isinstance(raw, dict) else "ratbptt"
    if not isinstance(name, str):
        raise ConfigError(f"method: expected a method name, got {name!r}")
    return name


# ---------------------------------------------------------------------------------------------- presets and YAML


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


MAX_YAML_BYTES = 1 << 20  # a config or sweep file is a few KB
MAX_FLOW_NESTING = 64  # [ and { levels: configs use two or three; PyYAML's parser slows quadratically with depth


def _flow_nesting(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def load_yaml(text: str, where: str) -> Any:
    """A YAML document of plain values; ConfigError (one line) for invalid YAML, anchors and aliases (a 1 KB file
    of aliases can expand to gigabytes), nesting too deep to read, or a file far larger than any config."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text)} bytes, more than any config ({MAX_YAML_BYTES} at most); pass the "
                          "intended file")
    if _flow_nesting(text) > MAX_FLOW_NESTING:
        raise ConfigError(f"{where}: nested too deeply to be a config (more than {MAX_FLOW_NESTING} levels of [ or "
                          "{); fix the file")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"{where}: uses the YAML alias *{event.anchor}; write the values out (raydistill "
                                  "files take no anchors or aliases)")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config; fix the file") from None


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
    data = load_yaml(text, where) or {}
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
