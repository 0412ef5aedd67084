"""Gradient workers: the process-side home of a method's set-up; each task is the method's pure gradient function.

A worker sets up what the method needs (real data, a model factory) once; each task is a pure function of
(snapshot, meta-step, slot, the slot's state): the seed comes from (run seed, step, slot), so a task that Ray
retries after a crash recomputes exactly the same gradient. The real images come from the driver through the object
store (raydistill.distributed.shared_data): uint8, read in place, normalised per batch; a worker that holds a subset
of the shards sets the method up again when its subset changes (a pure function of the step and slot too).
Tensors cross process boundaries as float32 numpy arrays, never as CUDA tensors.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import ray
import torch

from raydistill.config import DistillConfig
from raydistill.config.loading import config_from_dict
from raydistill.data.registry import Dataset
from raydistill.distributed.backend import BACKENDS
from raydistill.distributed.shared_data import HeldData, SharedData, WorkerData
from raydistill.eval.train import build_network
from raydistill.methods.registry import get_method
from raydistill.runtime import compute_options, resolve_device, set_threads


def worker_device() -> torch.device:
    """The GPU Ray assigned to this process when there is a usable one, else the CPU.

    A logical GPU without CUDA (a simulated cluster, or a driver problem) falls back to the CPU rather than failing.
    """
    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")


def as_tensor(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    # Object-store arrays are read-only views; the copy keeps torch from aliasing shared memory.
    return None if array is None else torch.tensor(array, device=device)


def held_resources(cfg: DistillConfig, held: HeldData, dataset_info: tuple, needs: tuple[str, ...],
                   device: torch.device) -> dict:
    """What a method's `needs` ask a worker for, on the worker's device, from the training images it holds."""
    resources: dict = {"device": device, "dataset_info": dataset_info}
    if "train_data" in needs:
        resources["train_x"], resources["train_y"] = held.images, held.labels
    if "model_factory" in needs:
        num_classes, image_shape = dataset_info
        resources["model_factory"] = functools.partial(build_network, cfg.model.name, cfg, image_shape, num_classes)
    return resources


def method_resources(cfg: DistillConfig, dataset: Dataset, needs: tuple[str, ...], device: torch.device) -> dict:
    """The same for a whole loaded data set (one process: tests, benchmarks)."""
    held = HeldData(dataset.train_x.to(device), dataset.train_y.to(device), torch.arange(dataset.num_train))
    return held_resources(cfg, held, (dataset.num_classes, dataset.image_shape), needs, device)


def worker_options(cfg: DistillConfig, placement: dict) -> dict:
    """Ray actor options of a gradient worker: restarted without limit, placed by `placement`, in a process whose
    allocator keeps freed memory (raydistill.runtime.compute_options)."""
    return dict(max_restarts=-1, max_task_retries=-1, **placement, **compute_options(cfg.ray.reuse_memory))


class GradientWorker:
    def __init__(self, cfg_dict: dict, backend: str, shared: SharedData):
        self.cfg: DistillConfig = config_from_dict(cfg_dict)
        self.backend = BACKENDS[backend]
        if backend == "ray":
            set_threads(self.cfg.ray.worker_threads)
            self.device = worker_device()
        else:
            set_threads(self.cfg.threads)
            self.device = resolve_device(self.cfg.device)
        self.method = get_method(self.cfg.method)
        self.data = WorkerData(shared, self.backend, self.device)
        self.dataset_info = self.data.dataset_info()
        self.context = None
        self.hold(0, 0)  # set up now, so a worker that cannot start fails before the first step

    def hold(self, step: int, slot: int) -> None:
        """Set the method up on the images slot `slot` holds at `step` (again only when they changed)."""
        held, changed = self.data.at(step, slot)
        if changed or self.context is None:
            self.context = None  # release the old set-up's tensors first
            resources = held_resources(self.cfg, held, self.dataset_info, self.method.needs, self.device)
            self.context = self.method.setup(self.cfg, resources)

    def compute(self, snapshot: list, step: int, slot: int) -> dict:
        """One gradient on the snapshot `snapshot[0]` for (step, slot)."""
        began = time.perf_counter()
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
