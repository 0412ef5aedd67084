"""The planner's account of the shipped presets: each one's predicted peak per worker (`raydistill presets`).

A preset for images of 64 px or more targets the GPU workers of the cluster files: it must fit the smaller of
their GPUs, gcp-gpu.yaml's T4 (16 GB; aws-gpu.yaml's A10G has 24 GB), with the planner's headroom. Smaller
images are planned on the CPU, where they run on a laptop.

Planning every preset takes a minute or two, so `cached_peaks` keeps each answer in the user's cache folder, keyed by
the preset's text, the planner's constants and the raydistill and torch versions: an edited preset, another
release or a damaged cache file is planned again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

import raydistill
from raydistill.config import ConfigError, DistillConfig
from raydistill.config.loading import PRESETS, preset_names
from raydistill.plan import devices
from raydistill.plan.devices import CPU, Device, format_bytes, gpu
from raydistill.plan.estimate import Plan, plan
from raydistill.plan.shapes import plan_data
from raydistill.setup import load_config

LARGE_IMAGE = 64  # pixels per side from which a preset is sized for a GPU
PRESET_GPU = "t4"  # the smaller GPU of the cluster files


def preset_device(cfg: DistillConfig) -> Device:
    side = plan_data(cfg).shape.image_shape[-1]
    return gpu(PRESET_GPU).shared(cfg.ray.gpus_per_worker) if side >= LARGE_IMAGE else CPU


def preset_plan(cfg: DistillConfig) -> Plan:
    return plan(cfg, plan_data(cfg), preset_device(cfg))


def preset_peak(cfg: DistillConfig) -> str:
    """One worker's predicted peak, and on what: "14.2 GiB on t4 (fits)", "1.1 GiB on cpu", "not modelled"."""
    try:
        p = preset_plan(cfg)
    except ConfigError:
        return "unknown data size"
    if p.worker.peak is None:
        return "not modelled"
    verdict = "" if p.fits is None else " (fits)" if p.fits else " (DOES NOT FIT)"
    return f"{format_bytes(p.worker.peak)} on {p.device.name}{verdict}"


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "raydistill" / "preset-peaks.json"


def _key(name: str) -> str:
    constants = (devices.CPU_SCALE, devices.GPU_SLACK, devices.GPU_CONTEXT, devices.HEADROOM, PRESET_GPU)
    text = (PRESETS / f"{name}.yaml").read_text()
    return hashlib.sha256(repr((text, constants, raydistill.__version__, torch.__version__)).encode()).hexdigest()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) \
        else {}


def cached_peaks(names: list[str] | None = None, progress=None) -> dict[str, str]:
    """`preset_peak` of every shipped preset (or of `names`), from the cache where it holds the same preset; the
    rest are planned (`progress(name)` is called before each) and written back."""
    path = cache_file()
    cache = _read(path)
    out = {}
    for name in names or preset_names():
        key = _key(name)
        if key not in cache:
            if progress is not None:
                progress(name)
            cache[key] = preset_peak(load_config(name, check_paths=False))
        out[name] = cache[key]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(cache, tmp)
        os.replace(tmp.name, path)
    except OSError:  # a read-only home: the answers are still printed, only not kept
        pass
    return out
