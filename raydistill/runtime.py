"""Where the maths runs: joining Ray, device choice, torch thread count, and the C allocator of Ray's compute processes."""

from __future__ import annotations

import logging
import os

import numpy as np
import ray
import torch

from raydistill.compat import loopback_init_kwargs, loopback_only
from raydistill.config import ConfigError, DistillConfig


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


def worker_device() -> torch.device:
    """The GPU Ray assigned to this process when there is a usable one, else the CPU.

    A logical GPU without CUDA (a simulated cluster, or a driver problem) falls back to the CPU rather than failing.
    """
    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s)
    return torch.device("cpu")


def compute_device(cfg: DistillConfig, on_ray: bool) -> torch.device:
    """Set up a process that computes (a gradient worker, the validator, an evaluation task) and return its device.

    On Ray: `cfg.ray.worker_threads` torch threads and the GPU Ray assigned, if any. In this process: `cfg.threads`
    (0 leaves the count alone) and `cfg.device`.
    """
    if on_ray:
        set_threads(cfg.ray.worker_threads)
        return worker_device()
    set_threads(cfg.threads)
    return resolve_device(cfg.device)


def as_tensor(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    # Object-store arrays are read-only views; the copy keeps torch from aliasing shared memory.
    return None if array is None else torch.tensor(array, device=device)


SMALL_NETWORK_GPU_SHARE = 0.25  # a validation or evaluation network is small: four share a GPU

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


def connect(address: str | None) -> bool:
    """Join `address` (or RAY_ADDRESS), else start an embedded local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A Ray started here (no address, no RAY_ADDRESS) serves this process alone: it binds to loopback only; so does
    # a driver joining a cluster on this machine's loopback (it must reach the head where the head listens).
    target = address or os.environ.get("RAY_ADDRESS") or ""
    local = not target or target.split("://")[-1].startswith(("127.", "localhost"))
    try:
        with loopback_only(local):
            # "local": a Ray of its own, never whichever cluster this machine last started (ray.init's default
            # joins the one named in /tmp/ray/ray_current_cluster); a cluster is joined only when named.
            ray.init(address=address or (None if os.environ.get("RAY_ADDRESS") else "local"), include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True,
                     **(loopback_init_kwargs() if local else {}))
    except ConnectionError as exc:
        raise ConfigError(f"ray.address: cannot reach a Ray cluster at {address!r} ({exc}); start one with "
                          "'ray start --head' or leave ray.address unset for a local Ray") from None
    return True
