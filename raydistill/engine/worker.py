"""Gradient workers and the validator: the process-side homes of a method's set-up and of the validation split.

A worker sets up what the method needs (real data, a model factory) once; each task is a pure function of
(snapshot, meta-step, slot, the slot's state): the seed comes from (run seed, step, slot), so a task that Ray
retries after a crash recomputes exactly the same gradient. The real images come from the driver through the object
store (raydistill.engine.shared_data): uint8, read in place, normalised per batch; a worker that holds a subset
of the shards sets the method up again when its subset changes (a pure function of the step and slot too).
Tensors cross process boundaries as float32 numpy arrays, never as CUDA tensors.
"""

from __future__ import annotations

import functools
import os
import time

import ray
import torch

from raydistill.config import DistillConfig
from raydistill.data.registry import Dataset, load_dataset
from raydistill.engine.backend import BACKENDS
from raydistill.engine.shared_data import HeldData, SharedData, WorkerData, validation_split
from raydistill.evaluate.validator import Validator
from raydistill.methods.base import WorkerResources
from raydistill.methods.registry import get_method
from raydistill.models.registry import build_network
from raydistill.runtime import SMALL_NETWORK_GPU_SHARE, as_tensor, compute_device, compute_options


def held_resources(cfg: DistillConfig, held: HeldData, dataset_info: tuple, needs: tuple[str, ...],
                   device: torch.device) -> WorkerResources:
    """What a method's `needs` ask a worker for, on the worker's device, from the training images it holds;
    `dataset_info` is (number of classes, image shape)."""
    num_classes, image_shape = dataset_info
    train_x = train_y = model_factory = None
    if "train_data" in needs:
        train_x, train_y = held.images, held.labels
    if "model_factory" in needs:
        model_factory = functools.partial(build_network, cfg.model.name, cfg.model, image_shape, num_classes)
    return WorkerResources(device, num_classes, image_shape, train_x, train_y, model_factory)


def method_resources(cfg: DistillConfig, dataset: Dataset, needs: tuple[str, ...],
                     device: torch.device) -> WorkerResources:
    """The same for a whole loaded data set (one process: tests, benchmarks)."""
    held = HeldData(dataset.train_x.to(device), dataset.train_y.to(device), torch.arange(dataset.num_train))
    return held_resources(cfg, held, (dataset.num_classes, dataset.image_shape), needs, device)


def worker_options(cfg: DistillConfig, placement: dict) -> dict:
    """Ray actor options of a gradient worker: restarted without limit, placed by `placement`, in a process whose
    allocator keeps freed memory (raydistill.runtime.compute_options)."""
    return dict(max_restarts=-1, max_task_retries=-1, **placement, **compute_options(cfg.ray.reuse_memory))


class GradientWorker:
    """Constructed from the checked config alone (a worker never reads data.root); a ref to the run's real data,
    which the driver holds, comes with every task. So a worker that Ray restarts needs no
    constructor argument in the object store, which the driver may no longer hold (ray-project/ray#53727)."""

    def __init__(self, cfg: DistillConfig, backend: str):
        self.cfg = cfg
        self.backend = BACKENDS[backend]
        self.device = compute_device(self.cfg, on_ray=backend == "ray")
        self.method = get_method(self.cfg.method)
        self.data: WorkerData | None = None
        self.context = None

    def attach(self, shared: SharedData) -> None:
        """Map the run's real data (at the first task, and at the first after a restart)."""
        if self.data is None:
            self.data = WorkerData(shared, self.backend, self.device)
            self.dataset_info = self.data.dataset_info()

    def hold(self, step: int, slot: int) -> None:
        """Set the method up on the images slot `slot` holds at `step` (again only when they changed)."""
        held, changed = self.data.at(step, slot)
        if changed or self.context is None:
            self.context = None  # release the old set-up's tensors first
            resources = held_resources(self.cfg, held, self.dataset_info, self.method.needs, self.device)
            self.context = self.method.setup(self.cfg, resources)

    def compute(self, data: list, snapshot: list, step: int, slot: int) -> dict:
        """One gradient on the snapshot `snapshot[0]` for (step, slot), on the real data whose SharedData is
        `data[0]` (read only at the first task, and at the first after a restart)."""
        began = time.perf_counter()
        if self.data is None:
            self.attach(self.backend.get(data[0]))
        self.hold(step, slot)
        snap = self.backend.get(snapshot[0])
        learnables = {k: as_tensor(v, self.device) for k, v in snap["learnables"].items()}
        hard = as_tensor(snap["hard_labels"], self.device)
        g = self.method.gradient(self.context, learnables, hard, step, slot, snap["slot_states"].get(slot))
        return {
            "step": step,
            "slot": slot,
            "version": snap["version"],
            "grads": {k: t.detach().cpu().numpy() for k, t in g.grads.items()},
            "loss": g.loss,
            "stats": g.stats,
            "slot_state": g.slot_state,
            "seconds": time.perf_counter() - began,
        }

    def where(self) -> dict:
        if not ray.is_initialized():
            return {"node_id": "local", "device": str(self.device), "gpu_ids": []}
        return {"node_id": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def validator_options(has_gpus: bool, reuse_memory: bool = True, gpu_share: float = SMALL_NETWORK_GPU_SHARE) -> dict:
    """Ray actor options for a `ValidatorActor`.

    It never reserves a CPU (num_cpus=0, like today's validation tasks), so it cannot keep a meta-gradient worker
    from being placed; with GPUs it asks for `gpu_share` of one. That share must be left free by the workers
    (e.g. ray.gpus_per_worker <= 1 - gpu_share on one GPU, or a spare GPU), otherwise the actor waits unplaced:
    pass has_gpus=False then, and it validates on the CPU. Validation is pure, so a restarted actor (it restarts
    without limit) may retry a call. `reuse_memory`: see raydistill.runtime.compute_options.
    """
    options: dict = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": 3, **compute_options(reuse_memory)}
    if has_gpus:
        options["num_gpus"] = gpu_share
    return options


class ValidatorActor:
    """The run's `Validator` (raydistill.evaluate.validator): the validation split arrives with the first call, from
    the driver's uint8 copy in the object store (raydistill.engine.shared_data), or is loaded here when it is given
    none; like a gradient worker, it takes nothing from the object store at construction.

    On Ray (`backend="ray"`) it runs on the GPU Ray assigned, if any, with `cfg.ray.worker_threads` torch threads, as
    the gradient workers do; in this process (`backend="local"`) on `cfg.device`. `validate` returns exactly what
    `validation_accuracy` returns for the snapshot on the same device and torch thread count.
    """

    def __init__(self, cfg: DistillConfig, backend: str = "ray"):
        self.cfg, self.backend = cfg, BACKENDS[backend]
        self.device = compute_device(cfg, on_ray=backend == "ray")
        self.validator: Validator | None = None  # set up at the first call (and the first after a restart)

    def validate(self, snapshot: dict, data: list | None = None) -> float:
        """Validation accuracy of `snapshot`, on the validation split of the SharedData `data[0]` (or loaded here
        without one)."""
        if self.validator is None:
            if data is None:
                dataset = load_dataset(self.cfg.data)
            else:
                shared = self.backend.get(data[0])
                val_x, val_y = validation_split(shared, self.backend, self.device)
                empty, no_labels = torch.empty(0), torch.empty(0, dtype=torch.int64)
                dataset = Dataset(shared.name, empty, no_labels, val_x, val_y, empty, no_labels,
                                  list(shared.class_names), shared.mean, shared.std, val_x.normaliser.zca)
            self.validator = Validator(self.cfg, dataset, self.device)
        return self.validator.validate(snapshot)


def validate_snapshot(cfg: DistillConfig, snapshot: dict) -> float:
    """One validation without a long-lived actor (a Ray task: e.g. a Tune trial scoring its nested budgets once)."""
    return ValidatorActor(cfg).validate(snapshot)
