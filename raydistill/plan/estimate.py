"""A run's memory plan: the peak of every process that holds the run's tensors, and whether it fits.

For one gradient worker: the method's rehearsed task (raydistill.methods.rehearsal) on the device, plus the real
images the worker holds there (on a GPU; on the CPU they sit in the node's shared object store, once per node). For
the validator and one evaluation task: a network training on the synthetic set (one step's peak) and the accuracy
pass, plus the split they read. For the parameter server (host memory): the learnables, their Adam moments, the
summed gradient and the gradients of K workers in flight, and a checkpoint's copy.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

from raydistill.config import DistillConfig
from raydistill.methods.registry import get_method
from raydistill.methods.rehearsal import DataShape, TaskMemory, inference_bytes, training_step_bytes
from raydistill.models.registry import build_network, inference_batch
from raydistill.models.speed import rehearsing_the_cpu
from raydistill.plan.devices import GIB, HEADROOM, Device
from raydistill.plan.shapes import PlanData

FLOAT = 4


@dataclass
class Estimate:
    """One process's predicted peak on its device, and what makes it up."""

    role: str
    peak: int | None  # None: not modelled (the method has no rehearsal)
    rehearsed: int = 0  # the bytes the rehearsal counted, before the device's calibration
    terms: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    on: str = "device"  # "device" (the worker's GPU or CPU slot) or "host" (the parameter server)
    task: TaskMemory | None = None  # the gradient worker's rehearsal
    flops: float | None = None  # floating-point operations of one average task (when counted)


@dataclass
class Plan:
    config: DistillConfig
    data: PlanData
    device: Device
    estimates: list[Estimate]

    @property
    def worker(self) -> Estimate:
        return self.estimates[0]

    @property
    def budget(self) -> int | None:
        """The bytes a worker may use with the headroom kept free (None: no limit given)."""
        return None if self.device.memory is None else int(self.device.memory * (1 - HEADROOM))

    @property
    def largest(self) -> Estimate:
        """The device-side process with the largest predicted peak."""
        on_device = [e for e in self.estimates if e.on == "device" and e.peak is not None]
        return max(on_device, key=lambda e: e.peak) if on_device else self.worker

    @property
    def modelled(self) -> bool:
        return self.worker.peak is not None

    @property
    def worker_fits(self) -> bool | None:
        if self.budget is None or not self.modelled:
            return None
        return self.worker.peak <= self.budget

    @property
    def fits(self) -> bool | None:
        """Whether every device-side process fits with the headroom; None when unknown."""
        if self.budget is None or not self.modelled:
            return None
        return self.largest.peak <= self.budget


def task_estimate(cfg: DistillConfig, shape: DataShape, device: Device) -> Estimate:
    """One gradient task of cfg's method on `device` (no held data, no runtime): what benchmarks/bench_plan.py
    compares with a measured peak."""
    try:
        with rehearsing_the_cpu() if device.kind == "cpu" else contextlib.nullcontext():  # the CPU's speed layers
            task = get_method(cfg.method).rehearse(cfg, shape)
    except (NotImplementedError, RuntimeError) as exc:  # an op without a meta kernel (a network of one's own)
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        return Estimate("gradient worker", None, notes=[f"could not be rehearsed on the meta device ({first}): "
                                                        "not planned"])
    if task is None:
        return Estimate("gradient worker", None, notes=[f"method {cfg.method} has no memory rehearsal: not planned"])
    peak = device.peak(task.peak)
    terms = dict(task.terms)
    if peak != task.peak:
        terms["allocator and runtime" if device.kind == "gpu" else "allocator (measured calibration)"] = \
            peak - task.peak
    return Estimate("gradient worker", peak, task.peak, terms, list(task.notes), task=task)


def held_bytes(cfg: DistillConfig, data: PlanData) -> int:
    """uint8 training pixels a worker holds: the split, or about data.cache_gb of its shards past that."""
    c, h, w = data.shape.image_shape
    split = max(data.train_images - cfg.data.val_size, 0) * c * h * w
    return min(split, int(cfg.data.cache_gb * GIB))


def worker_estimate(cfg: DistillConfig, data: PlanData, device: Device) -> Estimate:
    est = task_estimate(cfg, data.shape, device)
    if est.peak is None:
        return est
    held = held_bytes(cfg, data)
    if device.kind == "gpu":
        est.terms["real images held (uint8)"] = held
        est.peak += held
    else:
        est.notes.append(f"the real images ({held / GIB:.2f} GiB uint8) sit in the node's object store, "
                         "shared by its workers")
    return est


def _network_estimate(role: str, cfg: DistillConfig, data: PlanData, device: Device, split_images: int) -> Estimate:
    """A network trained on the synthetic set and an accuracy pass over a split of `split_images` images."""
    shape = data.shape
    n_syn = cfg.ipc * shape.num_classes
    batch = min(cfg.eval.batch_size, n_syn)
    peak, terms = 0, {}
    for arch in dict.fromkeys([cfg.model.name, *cfg.eval.archs]) if role == "evaluation task" else [cfg.model.name]:
        def net(arch=arch):
            return build_network(arch, cfg.model, shape.image_shape, shape.num_classes)
        train = training_step_bytes(net(), batch, shape)
        infer = inference_bytes(net(), inference_batch(shape.image_shape), shape)
        if max(train, infer) > peak:
            peak = max(train, infer)
            terms = {f"{arch}: {'training step' if train >= infer else 'accuracy pass'}": peak}
    c, h, w = shape.image_shape
    syn = n_syn * (c * h * w + shape.num_classes) * FLOAT
    terms["synthetic set"] = syn
    rehearsed = peak + syn
    total = device.peak(rehearsed)
    if total != rehearsed:
        terms["allocator and runtime"] = total - rehearsed
    if device.kind == "gpu":
        terms["split read (uint8)"] = split_images * c * h * w
        total += split_images * c * h * w
    return Estimate(role, total, rehearsed, terms)


def server_estimate(cfg: DistillConfig, data: PlanData) -> Estimate:
    c, h, w = data.shape.image_shape
    n = cfg.ipc * data.shape.num_classes
    learnables = n * c * h * w * FLOAT + (n * data.shape.num_classes * FLOAT if cfg.labels.learn else 0)
    k = cfg.ray.workers
    terms = {"learnables": learnables, "Adam moments and the averaged gradient": 3 * learnables,
             f"gradients in flight ({k} workers)": k * learnables, "checkpoint copy": learnables}
    return Estimate("parameter server", sum(terms.values()), sum(terms.values()), terms, on="host")


def plan(cfg: DistillConfig, data: PlanData, device: Device, count_flops: bool = False) -> Plan:
    """The run's plan on `device` (the memory one worker gets: a GPU share, or a CPU node's memory per worker);
    `count_flops` also counts a task's floating-point operations, for a rough step time."""
    estimates = [worker_estimate(cfg, data, device)]
    if count_flops:
        with rehearsing_the_cpu() if device.kind == "cpu" else contextlib.nullcontext():
            estimates[0].flops = get_method(cfg.method).step_flops(cfg, data.shape)
    if cfg.eval.every:
        estimates.append(_network_estimate("validator", cfg, data, device, max(cfg.data.val_size, 0)))
    estimates.append(_network_estimate("evaluation task", cfg, data, device, data.test_images))
    estimates.append(server_estimate(cfg, data))
    return Plan(cfg, data, device, estimates)


def share_of(memory: int, workers: int) -> int:
    return int(memory // max(1, math.ceil(workers)))
