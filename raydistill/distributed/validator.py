"""A long-lived validation actor: the validation split arrives once, then each snapshot costs only its networks.

Validation tasks that load the data set (and fit ZCA) for every snapshot pay that each time; this actor pays it once
in `__init__`: it reads the driver's uint8 copy from the object store (raydistill.distributed.shared_data), or loads
the data set itself when it is given none. `validate` returns exactly what `raydistill.eval.validation.validation_accuracy` returns for the
snapshot on the same device and torch thread count (`cfg.ray.worker_threads` on Ray).
Start it with `ray.remote(Validator).options(**validator_options(has_gpus)).remote(cfg_dict)`, or in this process
as `Validator(cfg_dict, backend="local")`. `validate_snapshot` is the one-shot form, a plain Ray task.
"""

from __future__ import annotations

import torch

from raydistill.config.loading import config_from_dict
from raydistill.data.registry import Dataset, load_dataset
from raydistill.distributed.backend import BACKENDS
from raydistill.distributed.shared_data import SharedData, validation_split
from raydistill.distributed.worker import as_tensor, worker_device
from raydistill.eval.validation import validation_accuracy
from raydistill.runtime import compute_options, resolve_device, set_threads

VALIDATOR_GPU_SHARE = 0.25  # a validation trains cfg.eval.val_models small networks: a quarter GPU keeps up


def validator_options(has_gpus: bool, reuse_memory: bool = True, gpu_share: float = VALIDATOR_GPU_SHARE) -> dict:
    """Ray actor options for a `Validator`.

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


class Validator:
    """Validation accuracy of snapshots, with the data set (validation split, ZCA) loaded once.

    On Ray (`backend="ray"`) it runs on the GPU Ray assigned, if any, with `cfg.ray.worker_threads` torch threads, as
    the gradient workers do; in this process (`backend="local"`) on `cfg.device`, leaving the thread count alone.
    """

    def __init__(self, cfg_dict: dict, backend: str = "ray", shared: SharedData | None = None):
        self.cfg = config_from_dict(cfg_dict)
        if backend == "ray":
            set_threads(self.cfg.ray.worker_threads)
            self.device = worker_device()
        else:
            self.device = resolve_device(self.cfg.device)
        if shared is None:
            dataset = load_dataset(self.cfg.data)
            val_x, val_y = dataset.val_x.to(self.device), dataset.val_y.to(self.device)
            name, classes, mean, std, zca = dataset.name, dataset.class_names, dataset.mean, dataset.std, dataset.zca
        else:
            val_x, val_y = validation_split(shared, BACKENDS[backend], self.device)
            name, classes, mean, std, zca = shared.name, shared.class_names, shared.mean, shared.std, val_x.normaliser.zca
        # The actor lives as long as the run: it keeps only the validation split (on the device, uint8), and empty
        # train and test splits that still carry the image shape networks are built from.
        empty = torch.empty(0, *val_x.shape[1:])
        no_labels = torch.empty(0, dtype=torch.int64)
        self.dataset = Dataset(name, empty, no_labels, val_x, val_y, empty, no_labels, list(classes), mean, std, zca)

    def validate(self, snapshot: dict) -> float:
        """Mean validation accuracy (percent) of fresh networks trained on the snapshot's images and labels."""
        images, hard, soft = (as_tensor(snapshot.get(k), self.device) for k in ("images", "hard_labels", "soft_labels"))
        return validation_accuracy(images, hard, soft, self.dataset, self.cfg, self.device)


def validate_snapshot(cfg_dict: dict, snapshot: dict) -> float:
    """One validation without a long-lived actor (a Ray task: e.g. a Tune trial scoring its nested budgets once)."""
    return Validator(cfg_dict).validate(snapshot)
