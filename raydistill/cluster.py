"""Connecting to Ray and placing the run's workers: fail fast with a clear message, never hang."""

from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raydistill.config import ConfigError, RayConfig


def connect(address: str | None) -> bool:
    """Join `address` (or RAY_ADDRESS), else start an embedded local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    except ConnectionError as exc:
        raise ConfigError(f"ray.address: cannot reach a Ray cluster at {address!r} ({exc}); start one with "
                          "'ray start --head' or leave ray.address unset for a local Ray") from None
    return True


def worker_resources(rc: RayConfig) -> dict:
    """Resources of one worker: a GPU (or a fraction) where the cluster has GPUs, else CPU slots.

    Raises ConfigError when the cluster can never hold `rc.workers` of them, instead of waiting forever.
    """
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if total.get("GPU", 0) > 0:
        bundle = {"GPU": rc.gpus_per_worker, "CPU": 1.0}
        need, have, knob = rc.workers * rc.gpus_per_worker, total["GPU"], "ray.gpus_per_worker"
        unit = "GPU"
    else:
        bundle = {"CPU": rc.cpus_per_worker}
        need, have, knob = rc.workers * rc.cpus_per_worker, total.get("CPU", 0), "ray.cpus_per_worker"
        unit = "CPU"
    if need > have + 1e-9:
        raise ConfigError(f"ray.workers: {rc.workers} workers need {need:g} {unit} but the cluster has {have:g}; "
                          f"lower ray.workers (--workers) or {knob}")
    if not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes):
        raise ConfigError(f"{knob}: no single node has {bundle} for one worker; lower {knob}")
    return bundle


class WorkerPlacement:
    """A placement group with one bundle per worker; `options(i)` schedules worker i into bundle i."""

    def __init__(self, bundle: dict, count: int, timeout_s: float):
        self.bundle = bundle
        self.group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(self.group)
            raise ConfigError(f"ray.placement_timeout_s: {count} workers of {bundle} could not be placed within "
                              f"{timeout_s:g} s (other jobs may hold the resources); free them or lower ray.workers")

    def options(self, index: int) -> dict:
        return {
            "num_cpus": self.bundle.get("CPU", 0),
            "num_gpus": self.bundle.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
        }

    def remove(self) -> None:
        remove_placement_group(self.group)
