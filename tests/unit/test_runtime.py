"""Compute processes keep freed memory for reuse (`ray.reuse_memory`, raydistill.runtime.compute_options)."""

import resource
import sys

import pytest
import torch

from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.evaluate.remote import task_options
from raydistill.engine.worker import validator_options
from raydistill.engine.worker import worker_options
from raydistill.runtime import MALLOC_TUNABLES, compute_options

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


def test_compute_options_set_the_tunables_only_when_asked(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert compute_options(True) == {"runtime_env": {"env_vars": {"GLIBC_TUNABLES": MALLOC_TUNABLES}}}
    assert compute_options(False) == {}
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")  # a user's own tunables are kept
    assert compute_options(True)["runtime_env"]["env_vars"]["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + MALLOC_TUNABLES
    monkeypatch.setenv("GLIBC_TUNABLES", MALLOC_TUNABLES)  # not repeated
    assert compute_options(True)["runtime_env"]["env_vars"]["GLIBC_TUNABLES"] == MALLOC_TUNABLES


@pytest.mark.parametrize("reuse", [True, False])
def test_every_compute_process_gets_the_setting(monkeypatch, reuse):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    cfg = load_config("quickstart", [f"ray.reuse_memory={str(reuse).lower()}"], check_paths=False)
    expected = compute_options(reuse).get("runtime_env")
    placement = {"scheduling_strategy": "SPREAD"}
    worker = worker_options(cfg, placement)
    assert worker.get("runtime_env") == expected and worker["scheduling_strategy"] == "SPREAD"
    assert worker["max_restarts"] == -1
    assert validator_options(False, cfg.ray.reuse_memory).get("runtime_env") == expected
    assert task_options(cfg).get("runtime_env") == expected and task_options(cfg)["max_retries"] == 3
    assert task_options(cfg, {"num_gpus": 0.25}) == {**compute_options(reuse), "num_gpus": 0.25}


def test_a_bad_reuse_memory_value_is_a_config_error():
    with pytest.raises(ConfigError, match="ray.reuse_memory"):
        load_config("quickstart", ["ray.reuse_memory=sometimes"], check_paths=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_a_ray_process_with_the_tunables_reuses_large_blocks_instead_of_faulting_them_in(ray_session):
    """The claim behind the option, in the processes it configures: a freed 64 MiB block is reused (no page
    faults), where a process without it maps, faults in and unmaps every page each time (the control)."""
    task = ray_session.remote(faults_per_large_tensor)
    tuned = ray_session.get(task.options(num_cpus=0, **compute_options(True)).remote())
    plain = ray_session.get(task.options(num_cpus=0).remote())
    assert plain > 0.9 * PAGES, plain  # the default: every page of every fresh block faults
    assert tuned < 0.02 * PAGES, tuned
