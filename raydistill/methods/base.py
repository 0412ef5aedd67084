"""The Method interface: what a distillation method tells the engine, and nothing the engine must know beyond it.

A method declares
- its config section (`config_cls`, built from the YAML section named `name` and checked by `validate`);
- what it needs on a worker (`needs`) and how a worker is set up (`setup` -> an opaque context);
- its learnable tensors (`learnables`): images and learned labels by default, and any others it adds
  (`init_extra`); the meta-update, the parameter server, checkpoints and the artifact carry them by name;
- one gradient task, `gradient(context, learnables, step, slot, slot_state)`: a pure function of the snapshot,
  the step and the slot (the seed is derived from them), returning a gradient for each learnable tensor, a loss,
  and statistics that the engine logs as they are;
- optionally, state a worker slot keeps from one task to the next: the task receives the slot's state and returns
  the next one; the parameter server stores it with the step it belongs to and checkpoints it, so a restarted
  worker or server continues exactly where the applied steps left off.

Nothing here imports Ray: a method runs and is tested in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from raydistill.config.schema import DistillConfig
from raydistill.methods.rehearsal import DataShape, TaskMemory
from raydistill.models.registry import network_from_seed

IMAGES, SOFT_LABELS = "images", "soft_labels"  # the learnables every method has (labels only when learned)

# What a worker can provide to a method's setup().
NEEDS = ("train_data", "model_factory")


@dataclass(frozen=True)
class Learnable:
    """How the meta-update treats one learnable tensor."""

    lr_scale: float = 1.0  # its meta learning rate is meta.lr x lr_scale
    clamp_min: float | None = None  # clamped from below after every update (learned labels: 0)
    per_example: bool = True  # row i belongs to synthetic example i: Boost-DD scales it per block, prefixes slice it


@dataclass
class Gradient:
    """What one gradient task returns."""

    grads: dict[str, Tensor]  # one gradient per learnable tensor, by name
    loss: float
    stats: dict = field(default_factory=dict)  # JSON-able; the engine logs it as it is
    slot_state: dict[str, np.ndarray] | None = None  # the slot's state after this task (None: the method keeps none)


@dataclass(frozen=True)
class Lever:
    """A setting that lowers a gradient task's memory, for the planner's suggestions (raydistill.plan.fit)."""

    field: str  # the dotted config field, e.g. "ratbptt.window_segments"
    values: list  # from the weakest to the strongest; memory falls along them
    time_factor: float  # about how much longer a step takes with it
    same_gradient: bool  # True: the same gradient up to float rounding; False: a different algorithm


ModelFactory = Callable[[], nn.Module]  # a worker's "model_factory" resource: a fresh network per call


@dataclass(frozen=True)
class WorkerResources:
    """What a worker hands a method's `setup`: always its device and the data set's shape; what `needs` asked for,
    already on the device (None otherwise): the training images and labels for "train_data" (the images may be a
    RealImages, normalised as they are read), a network factory for "model_factory"."""

    device: torch.device
    num_classes: int
    image_shape: tuple[int, ...]
    train_x: Any = None
    train_y: Tensor | None = None
    model_factory: ModelFactory | None = None


def seeded_network(model_factory: ModelFactory, rng: torch.Generator, like: Tensor) -> nn.Module:
    """A fresh random init seeded from `rng` (the global RNG is left alone), in train mode, on `like`'s device and
    dtype: how a task draws its network, so a retried task draws the same one."""
    model = network_from_seed(model_factory, int(torch.randint(0, 2**62, (1,), generator=rng)))
    return model.to(device=like.device, dtype=like.dtype).train()


def task_seed(run_seed: int, step: int, slot: int) -> int:
    """The seed of one gradient task: a pure function of (run seed, meta-step, worker slot)."""
    return int(np.random.SeedSequence([run_seed, step, slot]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Method:
    """Base class of a distillation method; subclasses set `name` and `config_cls` and implement `gradient`."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    needs: ClassVar[tuple[str, ...]] = NEEDS

    def validate(self, section: Any, cfg: DistillConfig) -> None:
        """Raise ConfigError (one line: field, problem, fix) when the section cannot work with `cfg`."""

    def validate_against_data(self, section: Any, cfg: DistillConfig, num_train: int, num_classes: int) -> None:
        """Checks that need the loaded data set's sizes."""

    def learnables(self, cfg: DistillConfig) -> dict[str, Learnable]:
        """The learnable tensors by name: the images, and the soft labels when labels are learned."""
        out = {IMAGES: Learnable()}
        if cfg.labels.learn:
            out[SOFT_LABELS] = Learnable(lr_scale=cfg.meta.label_lr_scale, clamp_min=0.0)
        return out

    def init_extra(self, cfg: DistillConfig, num_classes: int) -> dict[str, Tensor]:
        """Initial values of learnables beyond images and soft labels (none by default)."""
        return {}

    def setup(self, cfg: DistillConfig, resources: WorkerResources) -> Any:
        """A worker's context for `gradient`, from what the worker prepared for `needs` (see WorkerResources)."""
        return resources

    def gradient(self, context: Any, learnables: dict[str, Tensor], hard_labels: Tensor, step: int, slot: int,
                 slot_state: dict[str, np.ndarray] | None) -> Gradient:
        raise NotImplementedError

    def describe(self, section: Any) -> str:
        """One line for `raydistill presets`."""
        return self.name

    def rehearse(self, cfg: DistillConfig, shape: DataShape) -> TaskMemory | None:
        """The peak memory of one gradient task for `cfg` on data of `shape`, by term, from a rehearsal on the meta
        device (raydistill.methods.rehearsal); None: this method has no rehearsal, and the planner says so."""
        return None

    def step_flops(self, cfg: DistillConfig, shape: DataShape) -> float | None:
        """Floating-point operations of one average gradient task, counted in a rehearsal (for the planner's rough
        step time); None: not counted."""
        return None

    def memory_levers(self, cfg: DistillConfig) -> list[Lever]:
        """The settings that lower this method's task memory (none by default)."""
        return []

    def approximate_peak(self, cfg: DistillConfig, task: TaskMemory, changes: dict[str, Any]) -> int | None:
        """A quick estimate of the task's peak with some levers changed, from `task` (cfg's rehearsal), for ranking
        candidates before the chosen one is rehearsed; None: rehearse every candidate."""
        return None
