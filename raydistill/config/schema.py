"""The typed configuration: one object built by the CLI, the Python API, presets and Tune alike.

Every method-neutral setting is a field here. A distillation method's own settings live in the section named after
the method (`ratbptt:` for RaT-BPTT); its dataclass belongs to the method (raydistill.methods) and is stored in
`DistillConfig.method_config`. Building and validating happen once, at the edge (raydistill.config.loading).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INIT_MODES = ("noise", "real")
NORMS = ("instance", "batch", "none")
CPU_KERNELS = ("auto", "all", "none")  # model.cpu_kernels (raydistill.models.speed); YAML reads on/off as booleans
AUGMENTATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")  # DSA's (Zhao & Bilen, ICML 2021)
META_OPTIMIZERS = ("adam", "sgd")
EVAL_RECIPES = ("adam", "sgd")
BASELINES = ("random", "herding", "kcenter")  # real-image coresets every report shows beside the distilled set
RAY_MODES = ("sync", "async")


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    root: str | None = None  # None: the data set's default location (see raydistill.data.registry)
    val_size: int = 5000  # held out of the training split for checkpoint selection and Tune
    split_seed: int = 0
    zca: bool = False
    zca_reg: float = 0.1  # times the mean eigenvalue (KIP / FRePo recipe)
    image_size: int | None = None  # imagefolder / parquet: resize to this square size (None: keep)
    # Past this many GiB of uint8 training images, a worker holds a seeded random subset of shards, drawn anew
    # every resample_every meta-steps (raydistill.engine.shared_data); below it, the whole split.
    cache_gb: float = 8.0
    resample_every: int = 100
    # The data set's class count and training-split size, for `raydistill plan` where it cannot read them (a
    # prepared set not reachable from here). A loaded set must have `classes` classes (checked); train_images only
    # sizes the planner's held-data term.
    classes: int | None = None
    train_images: int | None = None


@dataclass
class ModelConfig:
    name: str = "convnet"
    width: int = 128
    depth: int = 3  # ConvNet only; ConvNet-4 for 64x64 inputs
    norm: str = "instance"
    # The CPU speed layers (Winograd and im2col convolutions, instance norm's analytic double backward, the fast 2x2
    # pool): auto picks them per machine from the CPU's ISA; all / none forces every one / plain PyTorch ops
    # (raydistill.models.speed).
    cpu_kernels: str = "auto"


@dataclass
class MetaOptConfig:
    optimizer: str = "adam"  # adam, or sgd (with momentum; the image updates DM, DC, DSA and CAFE publish)
    lr: float = 1e-3
    momentum: float = 0.5  # sgd only: torch.optim.SGD's momentum (no dampening, no Nesterov)
    label_lr_scale: float = 1.0  # learned labels step at lr * label_lr_scale
    clip_factor: float = 2.0  # clip the meta-gradient norm to clip_factor x EMA of past norms (0: never clip)
    ema_decay: float = 0.9


@dataclass
class LabelConfig:
    learn: bool = False  # learned soft labels: start one-hot, clamped >= 0 after each update


@dataclass
class AugmentConfig:
    """Differentiable augmentation (raydistill.data.augment); the defaults of the ratios are DSA's published ones."""

    strategies: list[str] = field(default_factory=lambda: ["flip", "rotate"])  # one drawn per batch
    rotate_degrees: float = 15.0  # rotate: an angle from [-rotate_degrees, rotate_degrees]
    brightness: float = 1.0  # color: add a constant from [-brightness/2, brightness/2)
    saturation: float = 2.0  # color: scale the deviation from the mean over channels by a factor from [0, saturation)
    contrast: float = 0.5  # color: scale the deviation from the image's mean by a factor from [contrast, contrast+1)
    crop_pad: float = 0.125  # crop: translate by whole pixels, up to crop_pad x the image size each way (zero fill)
    cutout_size: float = 0.5  # cutout: zero a square whose side is cutout_size x the image's side
    scale_ratio: float = 1.2  # scale: resample each axis at a factor from [1/scale_ratio, scale_ratio] (>1 shrinks)


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
    baselines: list[str] = field(default_factory=lambda: ["random"])  # also herding, kcenter (coresets)


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
    reuse_memory: bool = True  # workers, validator, evaluation tasks keep freed memory (raydistill.runtime)
    placement_timeout_s: float = 120.0  # give up (with a clear error) if workers cannot be placed by then
    max_consecutive_failures: int = 50  # failed meta-steps in a row before the run stops (Tune then retries it)
    write_retries: int = 5  # failed checkpoint / metrics writes in a row (with backoff) before the run stops


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
    method: str = "ratbptt"  # a registered method name, or "package.module:Class" (raydistill.methods)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch threads; 0 leaves torch's default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaOptConfig = field(default_factory=MetaOptConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    boost: BoostConfig = field(default_factory=BoostConfig)
    trackers: list[Any] = field(default_factory=list)  # mlflow / wandb / tensorboard entries (raydistill.watch.trackers)
    method_config: Any = None  # the method's own section (its dataclass), filled in by raydistill.config.loading
