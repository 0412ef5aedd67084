"""Connecting to Ray and placing the run's workers: fail fast with a clear message, never hang."""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from raydistill.config import ConfigError, RayConfig


def worker_resources(rc: RayConfig) -> dict:
    """Resources of one worker: a GPU (or a fraction) where the cluster has GPUs, else CPU slots.

    Raises ConfigError when the cluster can never hold `rc.workers` of them, instead of waiting forever.
    """
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    bundle = worker_bundle(rc, total.get("GPU", 0) > 0)
    if "GPU" in bundle:
        need, have, knob = rc.workers * rc.gpus_per_worker, total["GPU"], "ray.gpus_per_worker"
        unit = "GPU"
    else:
        need, have, knob = rc.workers * rc.cpus_per_worker, total.get("CPU", 0), "ray.cpus_per_worker"
        unit = "CPU"
    if need > have + 1e-9:
        raise ConfigError(f"ray.workers: {rc.workers} workers need {need:g} {unit} but the cluster has {have:g}; "
                          f"lower ray.workers (--workers) or {knob}")
    fits = sum(workers_that_fit(node, bundle) for node in nodes)
    if fits == 0:
        raise ConfigError(f"{knob}: no single node has {bundle} for one worker; lower {knob}")
    if fits < rc.workers:
        raise ConfigError(f"ray.workers: the cluster's nodes can hold only {fits} workers of {bundle} "
                          f"(a worker needs all of it on one node); lower ray.workers (--workers) or {knob}")
    return bundle


def worker_bundle(rc: RayConfig, gpus: bool) -> dict:
    """One worker's resources: a GPU share (and a CPU to feed it) on a GPU cluster, else CPU slots."""
    return {"GPU": rc.gpus_per_worker, "CPU": 1.0} if gpus else {"CPU": rc.cpus_per_worker}


def workers_that_fit(node: dict, bundle: dict) -> int:
    """How many identical worker bundles one node can hold (each needs every resource of the bundle)."""
    return min(int(node.get(k, 0) / v + 1e-9) for k, v in bundle.items())


def driver_node_strategy() -> NodeAffinitySchedulingStrategy:
    """Keep the parameter server beside the driver (soft): it then never goes down with a worker node."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


def placement_state(group) -> str:
    return placement_group_table(group).get("state", "UNKNOWN")


class WorkerPlacement:
    """A placement group with one bundle per worker; `options(i)` schedules worker i into bundle `first + i`."""

    first = 0  # the index of worker 0's bundle

    def __init__(self, bundle: dict, count: int, timeout_s: float):
        self.bundles = [dict(bundle) for _ in range(count)]
        self.group = placement_group(self.bundles, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(self.group)
            raise ConfigError(f"ray.placement_timeout_s: {count} workers of {bundle} could not be placed within "
                              f"{timeout_s:g} s (other jobs may hold the resources); free them or lower ray.workers")

    def options(self, index: int) -> dict:
        bundle = self.bundles[index]
        return {
            "num_cpus": bundle.get("CPU", 0),
            "num_gpus": bundle.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group,
                                                                    placement_group_bundle_index=self.first + index),
        }

    def remove(self) -> None:
        remove_placement_group(self.group)


class TrialPlacement(WorkerPlacement):
    """Workers in the bundles of a placement group made by someone else, such as a Ray Tune trial.

    Bundles `first`, `first + 1`, ... hold the workers, one each. A group with a different number of worker bundles
    is refused at once: a worker without a bundle would otherwise wait for resources that never come.
    """

    def __init__(self, group, first: int, workers: int):
        if group is None:
            raise ConfigError("placement: no placement group here; run the trial through raydistill.tune")
        bundles = placement_group_table(group).get("bundles", {})
        self.bundles = [bundles[i] for i in sorted(bundles) if i >= first]
        if len(self.bundles) != workers:
            raise ConfigError(f"ray.workers: the trial's placement group has {len(self.bundles)} worker bundles but "
                              f"the run starts {workers} workers; size the trial with raydistill.tune.trial_resources")
        self.group, self.first = group, first

    def remove(self) -> None:
        """Nothing: the group belongs to whoever made it (Tune removes a trial's group when the trial ends)."""
