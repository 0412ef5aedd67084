"""The final evaluation on Ray: every network of the report is one task (set, network, architecture).

The plan, the training sets and the assembly are those of `raydistill.evaluate.report`, and each network is the same pure
function of its seed, so on CPU this report equals `evaluation_report`'s exactly, provided the in-process run uses
the same torch thread count as the tasks (`cfg.ray.worker_threads`; CPU kernels reduce in a thread-dependent order)
and the same kind of CPU.

Data moves once: the driver selects the baselines (a random subset is an index draw; a coreset needs the training
split, which the driver already holds), then puts the evaluation split and each distinct training set into the
object store a single time; tasks receive references and never read the data set from disk.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from raydistill.config import DistillConfig
from raydistill.data.real import Normaliser, RealImages, pixels_from_numpy
from raydistill.data.registry import Dataset
from raydistill.evaluate.report import Network, ReportOptions, assemble, plan_networks, training_sets
from raydistill.evaluate.train import NetworkSpec, network_accuracy, split_of
from raydistill.runtime import as_tensor, compute_device, compute_options


def split_payload(x: RealImages | torch.Tensor, y: torch.Tensor) -> dict:
    """A split as plain arrays for the object store: uint8 pixels and the normaliser when it is a RealImages."""
    if isinstance(x, RealImages):
        return {"pixels": x.pixels(slice(None)).cpu().numpy(), "normaliser": x.normaliser.to_arrays(),
                "labels": y.cpu().numpy()}
    return {"images": x.cpu().numpy(), "labels": y.cpu().numpy()}


def split_from_payload(payload: dict, device: torch.device) -> tuple[RealImages | torch.Tensor, torch.Tensor]:
    if "pixels" in payload:  # read in place, normalised per batch
        images = RealImages(pixels_from_numpy(payload["pixels"]), Normaliser.from_arrays(payload["normaliser"]))
        return images.to(device), as_tensor(payload["labels"], device)
    return as_tensor(payload["images"], device), as_tensor(payload["labels"], device)


def task_options(cfg: DistillConfig, options: dict | None = None) -> dict:
    """Ray options of the evaluation tasks: `options` (default: `cfg.ray.worker_threads` CPUs, at least 1, and 3
    retries) in a process whose allocator keeps freed memory (raydistill.runtime.compute_options)."""
    options = options or {"num_cpus": max(1, cfg.ray.worker_threads), "max_retries": 3}
    return {**compute_options(cfg.ray.reuse_memory), **options}


def train_one(train: tuple[np.ndarray, np.ndarray], evaluation: dict, net: Network, cfg: DistillConfig,
              num_classes: int) -> float:
    """One network of the report (a Ray task; pure, so Ray may retry it): its accuracy on the evaluation split."""
    device = compute_device(cfg, on_ray=True)
    x, targets = (as_tensor(a, device) for a in train)
    eval_x, eval_y = split_from_payload(evaluation, device)
    spec = NetworkSpec(net.arch, num_classes, net.seed, cfg.eval.steps, net.augmented)
    return network_accuracy(x, targets, eval_x, eval_y, spec, cfg, device)


def evaluation_report_on_ray(
    x: torch.Tensor,
    targets: torch.Tensor,
    ipc: int,
    dataset: Dataset,
    cfg: DistillConfig,
    options: ReportOptions = ReportOptions(),
    *,
    ray_options: dict | None = None,
) -> dict:
    """`evaluation_report` with its networks trained as Ray tasks (Ray must be initialised); the same dict.

    `options.device` is where the driver selects coresets. `ray_options` are the tasks' Ray options; the default
    takes `cfg.ray.worker_threads` CPUs per task (at least 1); on a GPU cluster pass e.g. {"num_gpus": 0.25} to share
    GPUs. `options.tick` is called as each network finishes, in completion order.
    """
    archs, split, tick, device = options.archs or cfg.eval.archs, options.split, options.tick, options.device
    plan = plan_networks(cfg, archs, options.num_models or cfg.eval.num_models)
    sets = training_sets(plan, x, targets, ipc, dataset, cfg, device)
    evaluation = ray.put(split_payload(*split_of(dataset, split)))
    set_refs = {key: ray.put((a.cpu().numpy(), b.cpu().numpy())) for key, (a, b) in sets.items()}
    task = ray.remote(train_one).options(**task_options(cfg, ray_options))
    refs = [task.remote(set_refs[net.data], evaluation, net, cfg, dataset.num_classes) for net in plan]
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=1)
        if tick:
            tick()
    return assemble(plan, ray.get(refs), ipc, cfg, split)
