"""Validation of a built config on its own: types were checked when it was built; here ranges and cross-field rules.

Pure: no registry, no file system, no device. The method's own section is checked by the method, and names that live
in a registry (data set, model, method), the data root and the device by raydistill.setup.
"""

from __future__ import annotations

from raydistill.config.checks import at_least, choice, in_range, positive
from raydistill.config.errors import ConfigError
from raydistill.config.schema import (
    AUGMENTATIONS,
    BASELINES,
    CPU_KERNELS,
    EVAL_RECIPES,
    INIT_MODES,
    META_OPTIMIZERS,
    NORMS,
    RAY_MODES,
    DistillConfig,
)


def validate(cfg: DistillConfig) -> None:
    """Check every method-neutral field on its own and against the others; raise ConfigError on the first problem.

    Never changes `cfg`. Names that live in a registry (data set, model, method) and the machine are
    raydistill.setup's to check."""
    positive(cfg.ipc, "ipc")
    at_least(cfg.steps, 0, "steps")
    at_least(cfg.threads, 0, "threads")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: unknown value {cfg.device!r}; choose auto, cpu, cuda or cuda:N")
    _validate_data(cfg)

    m = cfg.model
    positive(m.width, "model.width")
    positive(m.depth, "model.depth")
    choice(m.norm, NORMS, "model.norm")
    choice(m.cpu_kernels, CPU_KERNELS, "model.cpu_kernels")

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


def _validate_data(cfg: DistillConfig) -> None:
    d = cfg.data
    at_least(d.val_size, 0, "data.val_size")
    positive(d.zca_reg, "data.zca_reg")
    positive(d.cache_gb, "data.cache_gb")
    positive(d.resample_every, "data.resample_every")
    for field in ("image_size", "classes", "train_images"):
        if getattr(d, field) is not None:
            positive(getattr(d, field), f"data.{field}")


def _validate_eval(cfg: DistillConfig) -> None:
    e = cfg.eval
    positive(e.num_models, "eval.num_models")
    positive(e.steps, "eval.steps")
    positive(e.lr, "eval.lr")
    positive(e.batch_size, "eval.batch_size")
    choice(e.recipe, EVAL_RECIPES, "eval.recipe")
    if not e.archs:
        raise ConfigError("eval.archs: empty; list at least one model, e.g. [convnet]")
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
