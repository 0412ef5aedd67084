"""Meta-gradient workers and validation tasks: Ray wrappers around the pure-PyTorch algorithm.

A worker caches the real training data and the model factory; each task is a pure function of
(snapshot, meta-step, slot): the seed comes from (run seed, step, slot), so a task that Ray retries after a crash
recomputes exactly the same gradient. Tensors cross actor boundaries as float32 numpy arrays, never as CUDA tensors.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from raydistill.config.core import DistillConfig, config_from_dict
from raydistill.data.registry import load_dataset
from raydistill.methods.ratbptt.meta_gradient import meta_gradient, task_seed
from raydistill.runtime import set_threads


def worker_device() -> torch.device:
    """The GPU Ray assigned to this process when there is a usable one, else the CPU.

    A logical GPU without CUDA (a simulated cluster, or a driver problem) falls back to the CPU rather than failing.
    """
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")


def as_tensor(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    # Object-store arrays are read-only views; the copy keeps torch from aliasing shared memory.
    return None if array is None else torch.tensor(array, device=device)


class MetaGradWorker:
    def __init__(self, cfg_dict: dict):
        from raydistill.distributed.local import model_factory  # not at import time: keeps `import raydistill.distributed.worker` light

        self.cfg: DistillConfig = config_from_dict(cfg_dict)
        set_threads(self.cfg.ray.worker_threads)
        self.device = worker_device()
        dataset = load_dataset(self.cfg.data)
        self.real_x, self.real_y = dataset.train_x.to(self.device), dataset.train_y.to(self.device)
        self.factory = model_factory(self.cfg, dataset)

    def compute(self, snapshot: list, step: int, slot: int) -> dict:
        """One meta-gradient on the snapshot `snapshot[0]` with the seed of (run seed, step, slot)."""
        snap = ray.get(snapshot[0])
        images = as_tensor(snap["images"], self.device)
        soft = as_tensor(snap["soft_labels"], self.device)
        hard = as_tensor(snap["hard_labels"], self.device)
        g = meta_gradient(images, hard, soft, self.real_x, self.real_y, self.factory, self.cfg.ratbptt,
                          self.cfg.augment, task_seed(self.cfg.seed, step, slot))
        return {
            "step": step,
            "slot": slot,
            "version": snap["version"],
            "images": g.images.detach().cpu().numpy(),
            "labels": None if g.labels is None else g.labels.detach().cpu().numpy(),
            "meta_loss": g.meta_loss,
            "start": g.start,
            "window": g.window,
            "seconds": g.seconds,
        }

    def where(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def validate_snapshot(cfg_dict: dict, snapshot: dict) -> float:
    """Validation accuracy of a snapshot (a Ray task: it runs beside distillation, never in its way)."""
    from raydistill.distributed.local import SyntheticSet, validation_accuracy

    cfg = config_from_dict(cfg_dict)
    set_threads(cfg.ray.worker_threads)
    dataset = load_dataset(cfg.data)
    syn = SyntheticSet(torch.tensor(snapshot["images"]), torch.tensor(snapshot["hard_labels"]),
                       None if snapshot["soft_labels"] is None else torch.tensor(snapshot["soft_labels"]))
    return validation_accuracy(syn, dataset, cfg, torch.device("cpu"))
