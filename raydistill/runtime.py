"""Where the maths runs: device choice, torch thread count, and the C allocator of Ray's compute processes."""

from __future__ import annotations

import os

import torch

from raydistill.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` picks the first GPU when there is one; asking for a GPU that is not there is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} asked for but no CUDA GPU is visible; set device=cpu or device=auto")
    return device


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


# glibc malloc settings for the processes that run raydistill's maths (see compute_options).
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:glibc.malloc.tcache_count=0"


def compute_options(reuse_memory: bool) -> dict:
    """Ray options for the gradient workers, the validator and evaluation tasks: a runtime_env whose
    GLIBC_TUNABLES make glibc keep freed memory in the process for reuse (`ray.reuse_memory`, on by default).

    glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so each inner step
    page-faults every page of every large activation again (100 images x 128 channels x 32 x 32 is 52 MB; the
    256-image meta-loss batch 134 MB): about 385 000 faults per CIFAR-sized IPC 1 meta-step on the 2-core CPU, and
    ReLU plus pooling over one 52 MB tensor took 82 ms instead of 48 ms (benchmarks/README.md). With mmap off and a
    2 GiB trim threshold freed blocks stay in the heap; the per-thread cache is off because its cached small blocks
    pin the boundaries between large free blocks, which then never merge (each step would grow the heap instead of
    reusing it). The resident size stays at its peak, which a compute process reaches again on every step.
    The tunables are read when a process starts, which is why this is a runtime_env and not a call in the worker.
    Ignored by other C libraries (macOS, musl).
    """
    if not reuse_memory:
        return {}
    inherited = os.environ.get("GLIBC_TUNABLES", "")
    value = inherited if MALLOC_TUNABLES in inherited else ":".join(filter(None, [inherited, MALLOC_TUNABLES]))
    return {"runtime_env": {"env_vars": {"GLIBC_TUNABLES": value}}}
