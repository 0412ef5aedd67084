"""Compute processes keep freed memory for reuse (`ray.reuse_memory`, raydistill.runtime.compute_options)."""

import pytest

from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.evaluate.remote import task_options
from raydistill.engine.worker import validator_options
from raydistill.engine.worker import worker_options
from raydistill.runtime import MALLOC_TUNABLES, compute_options


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
