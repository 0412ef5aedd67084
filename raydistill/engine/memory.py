"""The memory a run's placement gives one gradient worker, for the planner's pre-launch check (raydistill.plan).

- On Ray with GPUs: the GPU model Ray detected (its `accelerator_type:*` resource) times ray.gpus_per_worker (a
  share of one GPU); a model the planner does not know is not checked.
- On Ray without GPUs: a node's memory resource divided by the workers it holds (the smallest over the nodes).
- In process: the device cfg.device names (a GPU's total memory), or this machine's memory on the CPU.
"""

from __future__ import annotations

import os

import ray
import torch

from raydistill.config import DistillConfig
from raydistill.data.registry import Dataset
from raydistill.engine.cluster import worker_bundle, workers_that_fit
from raydistill.plan import GPUS, Device, from_dataset
from raydistill.plan.check import prelaunch
from raydistill.runtime import resolve_device

# Ray's accelerator_type names -> the planner's GPU names
RAY_GPU_TYPES = {"T4": "t4", "A10G": "a10g", "L4": "l4", "A100-40G": "a100-40", "A100-80G": "a100-80", "H100": "h100"}


def machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def in_process_device(cfg: DistillConfig) -> Device:
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Device(props.name, "gpu", props.total_memory)
    return Device("this machine's CPU", "cpu", machine_memory())


def ray_worker_device(cfg: DistillConfig) -> Device | None:
    """What one worker of cfg gets on the connected Ray cluster (None: not connected, or a GPU model the planner
    does not know)."""
    if not ray.is_initialized():
        return None
    total = ray.cluster_resources()
    share = min(1.0, cfg.ray.gpus_per_worker)
    if total.get("GPU", 0) > 0:
        types = [k.split(":", 1)[1] for k in total if k.startswith("accelerator_type:")]
        known = [RAY_GPU_TYPES[t] for t in types if t in RAY_GPU_TYPES]
        if not known or len(known) < len(types):
            return None
        name = min(known, key=lambda g: GPUS[g])
        return Device(name if share == 1 else f"{name} (share {share:g})", "gpu", int(GPUS[name] * share))
    bundle = worker_bundle(cfg.ray, False)
    per_worker = [n["Resources"].get("memory", 0) / min(fits, cfg.ray.workers)
                  for n in ray.nodes() if n.get("Alive") and (fits := workers_that_fit(n["Resources"], bundle)) > 0]
    if not per_worker or min(per_worker) <= 0:
        return None
    return Device("a CPU node's memory per worker", "cpu", int(min(per_worker)))


def worker_device(cfg: DistillConfig, in_process: bool) -> Device | None:
    return in_process_device(cfg) if in_process else ray_worker_device(cfg)


def fit_changes(cfg: DistillConfig, dataset: Dataset, in_process: bool, fit: str) -> dict:
    """The pre-launch memory check of cfg on the memory its placement gives a worker (raydistill.plan.check): the
    config changes `--fit auto` makes (logged), {} when it fits; ConfigError when it cannot fit. Ray must be
    connected unless `in_process`."""
    if fit == "off":
        return {}
    changes, message = prelaunch(cfg, from_dataset(dataset), worker_device(cfg, in_process), fit)
    if message:
        print(f"raydistill: {message}", flush=True)
    return changes
