"""Compute processes keep freed memory for reuse: a Ray task started with `ray.reuse_memory`'s options reuses a
freed large block where a plain one faults it in again (the options themselves: tests/unit/test_runtime.py)."""

import resource
import sys

import pytest
import torch

from raydistill.runtime import compute_options

ray_cloudpickle = pytest.importorskip("ray.cloudpickle")
ray_cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the task below runs in Ray's workers

BLOCK = 64 * 2**20  # above glibc's largest dynamic mmap threshold (32 MiB): mmapped by default
PAGES = BLOCK // 4096


def faults_per_large_tensor(repeats: int = 5) -> float:
    """Minor page faults per allocation of a fresh 64 MiB tensor that is written and freed, after a warm-up."""
    for _ in range(2):
        torch.ones(BLOCK // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.ones(BLOCK // 4)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_a_ray_process_with_the_tunables_reuses_large_blocks_instead_of_faulting_them_in(ray_session):
    """The claim behind the option, in the processes it configures: a freed 64 MiB block is reused (no page
    faults), where a process without it maps, faults in and unmaps every page each time (the control)."""
    task = ray_session.remote(faults_per_large_tensor)
    tuned = ray_session.get(task.options(num_cpus=0, **compute_options(True)).remote())
    plain = ray_session.get(task.options(num_cpus=0).remote())
    assert plain > 0.9 * PAGES, plain  # the default: every page of every fresh block faults
    assert tuned < 0.02 * PAGES, tuned
