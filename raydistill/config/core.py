"""Typed configuration: one object built by the CLI, the Python API, presets and Tune alike.

Everything a run needs is a field here. `load_config` and `config_from_dict` validate once, at the edge, and raise
`ConfigError` with a one-line message that names the field and the fix; the rest of the code trusts the object.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

WINDOW_MODES = ("random", "end", "fixed", "full", "random_length")
INNER_OPTIMIZERS = ("adam", "sgd")
INIT_MODES = ("noise", "real")
NORMS = ("instance", "batch", "none")
AUGMENTATIONS = ("flip", "rotate")
EVAL_RECIPES = ("adam", "sgd")
RAY_MODES = ("sync", "async")


class ConfigError(ValueError):
    """A configuration the user must fix; the message is one line naming the field and the fix."""


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    root: str | None = None  # None: the data set's default location (see raydistill.data.registry)
    val_size: int = 5000  # held out of the training split for checkpoint selection and Tune
    split_seed: int = 0
    zca: bool = False
    zca_reg: float = 0.1  # times the mean eigenvalue (KIP / FRePo recipe)
    image_size: int | None = None  # imagefolder / parquet: resize to this square size (None: keep)


@dataclass
class ModelConfig:
    name: str = "convnet"
    width: int = 128
    depth: int = 3  # ConvNet only; ConvNet-4 for 64x64 inputs
    norm: str = "instance"


@dataclass
class RatBpttConfig:
    unroll: int = 200  # T: inner steps from a fresh init to the meta-loss
    window: int = 60  # W: the last steps of a sampled window are back-propagated through
    window_mode: str = "random"
    fixed_start: int = 0  # the window start for window_mode=fixed
    inner_optimizer: str = "adam"
    inner_lr: float = 1e-3
    inner_momentum: float = 0.9  # sgd only
    batch_per_class: int | None = None  # None: every synthetic image of a chosen class
    classes_per_step: int | None = None  # None: every class
    real_batch: int = 256


@dataclass
class MetaOptConfig:
    lr: float = 1e-3
    label_lr_scale: float = 1.0  # learned labels step at lr * label_lr_scale
    clip_factor: float = 2.0  # clip the meta-gradient norm to clip_factor x EMA of past norms
    ema_decay: float = 0.9


@dataclass
class LabelConfig:
    learn: bool = False  # learned soft labels: start one-hot, clamped >= 0 after each update


@dataclass
class AugmentConfig:
    strategies: list[str] = field(default_factory=lambda: ["flip", "rotate"])  # one drawn per batch
    rotate_degrees: float = 15.0


@dataclass
class InitConfig:
    mode: str = "noise"  # noise: Gaussian, each image scaled to unit L2 norm; real: random training images


@dataclass
class EvalConfig:
    num_models: int = 5  # fresh networks trained per architecture
    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 256
    recipe: str = "adam"  # adam (Adam, constant lr) or sgd (DC-style: momentum 0.9, weight decay, lr x0.1 at half time)
    archs: list[str] = field(default_factory=lambda: ["convnet"])
    every: int = 0  # validate a snapshot every N meta-steps and keep the best (0: only at the end)
    val_models: int = 2  # networks per validation of a snapshot
    val_steps: int = 300


@dataclass
class RayConfig:
    workers: int = 1  # K meta-gradient workers
    mode: str = "sync"  # sync: average K gradients per step; async: apply as they arrive
    max_staleness: int = 2  # async: drop gradients computed on a snapshot more than this many versions old
    checkpoint_every: int = 50  # meta-steps between parameter-server checkpoints
    address: str | None = None  # None: an embedded local Ray (or RAY_ADDRESS); "auto": a running cluster
    gpus_per_worker: float = 1.0  # used when the cluster has GPUs; fractions share a GPU
    cpus_per_worker: float = 1.0  # used when it has none
    worker_threads: int = 1  # torch threads in each worker
    placement_timeout_s: float = 120.0  # give up (with a clear error) if workers cannot be placed by then
    max_consecutive_failures: int = 50  # failed meta-steps in a row before the run stops (Tune then retries it)


@dataclass
class BoostStage:
    block: int = 1  # images per class added by this stage
    steps: int = 1000  # meta-steps on the union
    beta: float = 0.1  # meta lr multiplier of the earlier blocks during this stage (0 freezes them)


@dataclass
class BoostConfig:
    stages: list[BoostStage] = field(default_factory=list)  # empty: a plain run


@dataclass
class DistillConfig:
    ipc: int = 10  # images per class
    steps: int = 1000  # meta-steps
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch threads; 0 leaves torch's default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ratbptt: RatBpttConfig = field(default_factory=RatBpttConfig)
    meta: MetaOptConfig = field(default_factory=MetaOptConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    boost: BoostConfig = field(default_factory=BoostConfig)


# ---------------------------------------------------------------------------------------------- dict <-> config


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(raw: dict, check_paths: bool = True) -> DistillConfig:
    """Build and validate a config from plain data (YAML, --set overrides, Tune samples)."""
    cfg = _build(DistillConfig, raw, "")
    validate(cfg, check_paths=check_paths)
    return cfg


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown field; valid fields here: {', '.join(sorted(names))}")
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".")
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
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- validation


def _choice(value: str, options: typing.Iterable[str], name: str) -> None:
    options = list(options)
    if value not in options:
        raise ConfigError(f"{name}: unknown value {value!r}; choose one of {', '.join(options)}")


def _positive(value: float, name: str) -> None:
    if value <= 0:
        raise ConfigError(f"{name}: must be > 0, got {value}")


def validate(cfg: DistillConfig, check_paths: bool = True) -> None:
    """Check everything that can be checked without loading data; raise ConfigError on the first problem."""
    from raydistill.data.registry import DATASETS, default_root  # registries live beside their implementations
    from raydistill.models.registry import MODELS

    _positive(cfg.ipc, "ipc")
    if cfg.steps < 0:
        raise ConfigError(f"steps: must be >= 0, got {cfg.steps}")
    if cfg.threads < 0:
        raise ConfigError(f"threads: must be >= 0, got {cfg.threads}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: unknown value {cfg.device!r}; choose auto, cpu, cuda or cuda:N")

    d = cfg.data
    _choice(d.name, DATASETS, "data.name")
    if d.val_size < 0:
        raise ConfigError(f"data.val_size: must be >= 0, got {d.val_size}")
    _positive(d.zca_reg, "data.zca_reg")
    if d.image_size is not None:
        _positive(d.image_size, "data.image_size")
    if check_paths:
        root = d.root if d.root is not None else default_root(d.name)
        if root is None:
            raise ConfigError(f"data.root: data set {d.name!r} has no default location; set data.root=/path/to/data")
        if not Path(root).exists():
            hint = (
                "install it with 'apt-get install -y dataset-fashion-mnist' or set data.root=DIR"
                if d.name == "fashion-mnist" and d.root is None
                else "point data.root at the directory that holds the data set"
            )
            raise ConfigError(f"data.root: {root} does not exist; {hint}")

    m = cfg.model
    _choice(m.name, MODELS, "model.name")
    _positive(m.width, "model.width")
    _positive(m.depth, "model.depth")
    _choice(m.norm, NORMS, "model.norm")

    r = cfg.ratbptt
    _positive(r.unroll, "ratbptt.unroll")
    _positive(r.window, "ratbptt.window")
    _choice(r.window_mode, WINDOW_MODES, "ratbptt.window_mode")
    _choice(r.inner_optimizer, INNER_OPTIMIZERS, "ratbptt.inner_optimizer")
    if r.window > r.unroll:
        raise ConfigError(
            f"ratbptt.window: window {r.window} > unroll {r.unroll}; set window <= unroll "
            "(the window is the back-propagated tail of the unroll)"
        )
    if r.window_mode == "fixed":
        if r.fixed_start < 0:
            raise ConfigError(f"ratbptt.fixed_start: must be >= 0, got {r.fixed_start}")
        if r.fixed_start + r.window > r.unroll:
            raise ConfigError(
                f"ratbptt.fixed_start: fixed_start {r.fixed_start} + window {r.window} > unroll {r.unroll}; "
                f"set fixed_start <= {r.unroll - r.window}"
            )
    _positive(r.inner_lr, "ratbptt.inner_lr")
    if not 0 <= r.inner_momentum < 1:
        raise ConfigError(f"ratbptt.inner_momentum: must be in [0, 1), got {r.inner_momentum}")
    if r.batch_per_class is not None:
        _positive(r.batch_per_class, "ratbptt.batch_per_class")
    if r.classes_per_step is not None:
        _positive(r.classes_per_step, "ratbptt.classes_per_step")
    _positive(r.real_batch, "ratbptt.real_batch")

    _positive(cfg.meta.lr, "meta.lr")
    _positive(cfg.meta.label_lr_scale, "meta.label_lr_scale")
    _positive(cfg.meta.clip_factor, "meta.clip_factor")
    if not 0 <= cfg.meta.ema_decay < 1:
        raise ConfigError(f"meta.ema_decay: must be in [0, 1), got {cfg.meta.ema_decay}")

    for i, s in enumerate(cfg.augment.strategies):
        _choice(s, AUGMENTATIONS, f"augment.strategies[{i}]")
    if cfg.augment.rotate_degrees < 0:
        raise ConfigError(f"augment.rotate_degrees: must be >= 0, got {cfg.augment.rotate_degrees}")
    _choice(cfg.init.mode, INIT_MODES, "init.mode")

    e = cfg.eval
    _positive(e.num_models, "eval.num_models")
    _positive(e.steps, "eval.steps")
    _positive(e.lr, "eval.lr")
    _positive(e.batch_size, "eval.batch_size")
    _choice(e.recipe, EVAL_RECIPES, "eval.recipe")
    if not e.archs:
        raise ConfigError("eval.archs: empty; list at least one model, e.g. [convnet]")
    for i, a in enumerate(e.archs):
        _choice(a, MODELS, f"eval.archs[{i}]")
    if e.every < 0:
        raise ConfigError(f"eval.every: must be >= 0, got {e.every}")
    _positive(e.val_models, "eval.val_models")
    _positive(e.val_steps, "eval.val_steps")

    for i, stage in enumerate(cfg.boost.stages):
        _positive(stage.block, f"boost.stages[{i}].block")
        _positive(stage.steps, f"boost.stages[{i}].steps")
        if not 0 <= stage.beta <= 1:
            raise ConfigError(f"boost.stages[{i}].beta: must be in [0, 1] (0 freezes earlier blocks), got {stage.beta}")

    rc = cfg.ray
    _positive(rc.workers, "ray.workers")
    _choice(rc.mode, RAY_MODES, "ray.mode")
    if rc.max_staleness < 0:
        raise ConfigError(f"ray.max_staleness: must be >= 0, got {rc.max_staleness}")
    _positive(rc.checkpoint_every, "ray.checkpoint_every")
    _positive(rc.gpus_per_worker, "ray.gpus_per_worker")
    _positive(rc.cpus_per_worker, "ray.cpus_per_worker")
    _positive(rc.worker_threads, "ray.worker_threads")
    _positive(rc.placement_timeout_s, "ray.placement_timeout_s")
    _positive(rc.max_consecutive_failures, "ray.max_consecutive_failures")


def validate_against_data(cfg: DistillConfig, num_train: int, num_classes: int, num_val: int) -> None:
    """Checks that need the loaded data set's sizes."""
    if cfg.eval.every and num_val == 0:
        raise ConfigError("eval.every: validation needs a validation split; set data.val_size > 0 or eval.every=0")
    r = cfg.ratbptt
    if r.real_batch > num_train:
        raise ConfigError(
            f"ratbptt.real_batch: {r.real_batch} is larger than the training split ({num_train} images); "
            f"set ratbptt.real_batch <= {num_train}"
        )
    if r.classes_per_step is not None and r.classes_per_step > num_classes:
        raise ConfigError(
            f"ratbptt.classes_per_step: {r.classes_per_step} > {num_classes} classes; set it <= {num_classes}"
        )
    if r.batch_per_class is not None and r.batch_per_class > cfg.ipc:
        raise ConfigError(f"ratbptt.batch_per_class: {r.batch_per_class} > ipc {cfg.ipc}; set it <= {cfg.ipc}")


# ---------------------------------------------------------------------------------------------- presets and YAML


def preset_names() -> list[str]:
    folder = resources.files("raydistill.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path_or_name: str) -> tuple[dict, str]:
    """A preset by name (shipped in the package) or by path; returns (data, where it came from)."""
    packaged = resources.files("raydistill.config") / "presets" / f"{path_or_name}.yaml"
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


def parse_override(text: str) -> tuple[list[str], Any]:
    """'ratbptt.window=40' -> (['ratbptt', 'window'], 40); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set ratbptt.window=40")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def merge_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Return a copy of `data` with each `key.path=value` set (nested mappings created as needed)."""
    out = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a group of fields")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def load_config(preset: str | None = None, overrides: typing.Iterable[str] = (), check_paths: bool = True) -> DistillConfig:
    """A validated config from a preset name or YAML path plus `key=value` overrides."""
    data: dict = {}
    if preset is not None:
        data, _ = _read_yaml(preset)
    return config_from_dict(merge_overrides(data, overrides), check_paths=check_paths)
