"""Validation of a built config: everything that can be checked before any data is loaded, then against the data.

The method's own section is checked by the method (raydistill.methods); everything else here.
"""

from __future__ import annotations

import torch

from raydistill.config.checks import at_least, choice, in_range, positive
from raydistill.config.errors import ConfigError
from raydistill.config.trackers import parse_trackers
from raydistill.config.schema import (AUGMENTATIONS, BASELINES, EVAL_RECIPES, INIT_MODES, META_OPTIMIZERS, NORMS,
                                      RAY_MODES, DistillConfig)
from raydistill.data.registry import DATASETS, Dataset, load_dataset, resolve_root
from raydistill.methods.registry import get_method
from raydistill.models.registry import MODELS, create_model
from raydistill.runtime import resolve_device


def validate(cfg: DistillConfig, check_paths: bool = True) -> None:
    """Check everything that can be checked without loading data; raise ConfigError on the first problem."""
    positive(cfg.ipc, "ipc")
    at_least(cfg.steps, 0, "steps")
    at_least(cfg.threads, 0, "threads")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: unknown value {cfg.device!r}; choose auto, cpu, cuda or cuda:N")
    cfg.trackers = parse_trackers(cfg.trackers)  # names become {name: ...} entries
    _validate_data(cfg, check_paths)

    m = cfg.model
    choice(m.name, MODELS, "model.name")
    positive(m.width, "model.width")
    positive(m.depth, "model.depth")
    choice(m.norm, NORMS, "model.norm")

    get_method(cfg.method).validate(cfg.method_config, cfg)

    choice(cfg.meta.optimizer, META_OPTIMIZERS, "meta.optimizer")
    positive(cfg.meta.lr, "meta.lr")
    in_range(cfg.meta.momentum, 0, 1, "meta.momentum")
    positive(cfg.meta.label_lr_scale, "meta.label_lr_scale")
    at_least(cfg.meta.clip_factor, 0, "meta.clip_factor")
    in_range(cfg.meta.ema_decay, 0, 1, "meta.ema_decay")

    _validate_augment(cfg)
    choice(cfg.init.mode, INIT_MODES, "init.mode")
    _validate_eval(cfg)

    for i, stage in enumerate(cfg.boost.stages):
        positive(stage.block, f"boost.stages[{i}].block")
        positive(stage.steps, f"boost.stages[{i}].steps")
        in_range(stage.beta, 0, 1, f"boost.stages[{i}].beta", high_open=False, why=" (0 freezes earlier blocks)")
    _validate_ray(cfg)


def _validate_augment(cfg: DistillConfig) -> None:
    a = cfg.augment
    for i, s in enumerate(a.strategies):
        choice(s, AUGMENTATIONS, f"augment.strategies[{i}]")
    in_range(a.rotate_degrees, 0, 180, "augment.rotate_degrees", high_open=False)
    at_least(a.brightness, 0, "augment.brightness")
    at_least(a.saturation, 0, "augment.saturation")
    at_least(a.contrast, 0, "augment.contrast")
    in_range(a.crop_pad, 0, 0.5, "augment.crop_pad", high_open=False, why=" (a fraction of the image size)")
    in_range(a.cutout_size, 0, 1, "augment.cutout_size", high_open=False, why=" (a fraction of the image side)")
    at_least(a.scale_ratio, 1, "augment.scale_ratio")


def _validate_data(cfg: DistillConfig, check_paths: bool) -> None:
    d = cfg.data
    choice(d.name, DATASETS, "data.name")
    at_least(d.val_size, 0, "data.val_size")
    positive(d.zca_reg, "data.zca_reg")
    positive(d.cache_gb, "data.cache_gb")
    positive(d.resample_every, "data.resample_every")
    if d.image_size is not None:
        positive(d.image_size, "data.image_size")
    if check_paths:
        resolve_root(d)


def _validate_eval(cfg: DistillConfig) -> None:
    e = cfg.eval
    positive(e.num_models, "eval.num_models")
    positive(e.steps, "eval.steps")
    positive(e.lr, "eval.lr")
    positive(e.batch_size, "eval.batch_size")
    choice(e.recipe, EVAL_RECIPES, "eval.recipe")
    if not e.archs:
        raise ConfigError("eval.archs: empty; list at least one model, e.g. [convnet]")
    for i, a in enumerate(e.archs):
        choice(a, MODELS, f"eval.archs[{i}]")
    at_least(e.every, 0, "eval.every")
    positive(e.val_models, "eval.val_models")
    positive(e.val_steps, "eval.val_steps")
    for i, b in enumerate(e.baselines):
        choice(b, BASELINES, f"eval.baselines[{i}]")


def _validate_ray(cfg: DistillConfig) -> None:
    rc = cfg.ray
    positive(rc.workers, "ray.workers")
    choice(rc.mode, RAY_MODES, "ray.mode")
    at_least(rc.max_staleness, 0, "ray.max_staleness")
    positive(rc.checkpoint_every, "ray.checkpoint_every")
    positive(rc.gpus_per_worker, "ray.gpus_per_worker")
    positive(rc.cpus_per_worker, "ray.cpus_per_worker")
    positive(rc.worker_threads, "ray.worker_threads")
    positive(rc.placement_timeout_s, "ray.placement_timeout_s")
    positive(rc.max_consecutive_failures, "ray.max_consecutive_failures")
    positive(rc.write_retries, "ray.write_retries")


def validate_against_data(cfg: DistillConfig, num_train: int, num_classes: int, num_val: int) -> None:
    """Checks that need the loaded data set's sizes."""
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
