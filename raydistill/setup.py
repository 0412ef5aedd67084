"""The setup layer: a config checked against the registries and this machine, built once at the edge.

`raydistill.config` checks what a config says on its own (types, ranges, cross-field rules). This module checks it
against the rest of raydistill: the method exists and accepts its section, the data set and every network are
registered, the data root exists, the device exists, and, once the data is loaded, the sizes fit and every network
takes the images. The CLI, the driver and Tune's trials build their configs here; workers, the validator and the
server get the checked object and never check it again (so a worker never needs the data root: its data arrives
through Ray's object store). `config_to_dict` is the inverse of `config_from_dict`: the method's section is written
back under the method's name, so a saved config.yaml loads again as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from raydistill.config import ConfigError, DistillConfig
from raydistill.config.checks import choice
from raydistill.config.loading import build_config, merge_overrides, method_name, read_preset
from raydistill.config.validate import validate
from raydistill.data.registry import DATASETS, Dataset, load_dataset, resolve_root
from raydistill.methods.registry import allow_import_path, check_file_method, get_method, method_names
from raydistill.models.registry import MODELS, create_model
from raydistill.runtime import resolve_device


def config_to_dict(cfg: Any) -> dict:
    """Plain data of a config (or of one section); the method's section sits under the method's name."""
    data = dataclasses.asdict(cfg)
    if isinstance(cfg, DistillConfig):
        section = data.pop("method_config")
        data[get_method(cfg.method).name] = section
    return data


def config_from_dict(raw: dict, check_paths: bool = True) -> DistillConfig:
    """Build and check a config from plain data (YAML, --set overrides, Tune samples)."""
    try:
        method = get_method(method_name(raw))
    except ConfigError as exc:
        if "expected a method name" in str(exc):
            raise ConfigError(f"{exc}; choose one of {', '.join(method_names())}") from None
        raise
    cfg = build_config(raw, method.name, method.config_cls, method_names())
    check(cfg, check_paths=check_paths)
    return cfg


def load_config(preset: str | None = None, overrides: Iterable[str] = (), check_paths: bool = True) -> DistillConfig:
    """A checked config from a preset name or YAML path plus `key=value` overrides: what the user names, so a
    method it names by import path may be imported (raydistill.methods.registry)."""
    data: dict = {}
    if preset is not None:
        data, _ = read_preset(preset)
    raw = merge_overrides(data, overrides)
    allow_import_path(raw.get("method") if isinstance(raw, dict) else None)
    return config_from_dict(raw, check_paths=check_paths)


def config_from_file(raw: Any, source: str, check_paths: bool = True) -> DistillConfig:
    """A config that raydistill wrote and reads back (a run's config.yaml, an artifact's metadata): built like any
    other, except that it may not name a method by import path the user has not named (files never name code)."""
    check_file_method(raw.get("method") if isinstance(raw, dict) else None, source)
    return config_from_dict(raw, check_paths=check_paths)


def check(cfg: DistillConfig, check_paths: bool = True) -> None:
    """Every check that needs no data: the fields (raydistill.config.validate), the registered names, the method's
    section, and with `check_paths` the data root. Never changes `cfg`."""
    validate(cfg)
    choice(cfg.data.name, DATASETS, "data.name")
    choice(cfg.model.name, MODELS, "model.name")
    for i, arch in enumerate(cfg.eval.archs):
        choice(arch, MODELS, f"eval.archs[{i}]")
    get_method(cfg.method).validate(cfg.method_config, cfg)
    if check_paths:
        resolve_root(cfg.data)


def validate_against_data(cfg: DistillConfig, num_train: int, num_classes: int, num_val: int) -> None:
    """Checks that need the loaded data set's sizes."""
    if cfg.data.classes is not None and cfg.data.classes != num_classes:
        raise ConfigError(f"data.classes: the config expects {cfg.data.classes} classes, the data set has "
                          f"{num_classes}; set data.classes={num_classes} or point data.root at the intended set")
    if cfg.eval.every and num_val == 0:
        raise ConfigError("eval.every: validation needs a validation split; set data.val_size > 0 or eval.every=0")
    get_method(cfg.method).validate_against_data(cfg.method_config, cfg, num_train, num_classes)


def load_checked(cfg: DistillConfig) -> Dataset:
    """The run's data set, with every check that needs it or this machine done: problems that would otherwise
    surface late (a batch larger than the data, a GPU that is not there, a network that cannot take the images)
    stop the run before it starts."""
    resolve_device(cfg.device)  # the driver evaluates on cfg.device: a missing GPU fails now, not after distilling
    dataset = load_dataset(cfg.data)
    validate_against_data(cfg, dataset.num_train, dataset.num_classes, len(dataset.val_y))
    check_archs(cfg, dataset.image_shape, dataset.num_classes)
    return dataset


def check_archs(cfg: DistillConfig, image_shape: tuple[int, ...], num_classes: int) -> None:
    """Every network the run builds (model.name, eval.archs) takes the data set's images: one forward on a blank one."""
    c, h, _ = image_shape
    m = cfg.model
    for field, arch in [("model.name", m.name), *((f"eval.archs[{i}]", a) for i, a in enumerate(cfg.eval.archs))]:
        try:
            with torch.no_grad():
                create_model(arch, c, num_classes, h, width=m.width, depth=m.depth, norm=m.norm).eval()(
                    torch.zeros(1, *image_shape))
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"{field}: {arch} cannot take {'x'.join(map(str, image_shape))} images "
                              f"({str(exc).splitlines()[0][:120]}); pick another model or data.image_size") from None
