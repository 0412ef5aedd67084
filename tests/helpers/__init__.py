"""What more than one test file uses: paths, skip marks, tiny configs and problems, and small builders.

Test files import from here (`from helpers import ...`; pyproject's pytest settings put tests/ on sys.path), never
from one another or from conftest.py, which holds fixtures only. The support files beside this one:
  toy_method.py         a plug-in method that Ray's workers import by name (helpers.toy_method:ToyMean)
  cluster_scenarios.py  simulated multi-node clusters, run as a script by run_scenario below
  log_scenario.py       a `raydistill distill` driver with its output in a file, run as a script
  reference_higher.py   the official RaT-BPTT meta-gradient on `higher`, the reference the gradients are checked on
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from raydistill.config import AugmentConfig
from raydistill.methods.base import Learnable
from raydistill.models.registry import create_model
from raydistill.setup import config_from_dict, config_to_dict, load_config
from raydistill.storage.artifact import DistilledSet, read_distilled
from raydistill.synset.meta_update import MetaOptimizer

REPO = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent
CLUSTER_SCENARIOS = HELPERS / "cluster_scenarios.py"
LOG_SCENARIO = HELPERS / "log_scenario.py"

FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION), reason="needs dataset-fashion-mnist")
needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="needs the optuna extra")


def one_line(exc: pytest.ExceptionInfo) -> str:
    """The exception's message, asserted to be a single line."""
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------------------------------------- the meta-update


def make_meta(images, soft, cfg):
    """A MetaOptimizer over the standard learnables: images, and soft labels when given."""
    tensors, specs = {"images": images}, {"images": Learnable()}
    if soft is not None:
        tensors["soft_labels"], specs["soft_labels"] = soft, Learnable(lr_scale=cfg.label_lr_scale, clamp_min=0.0)
    return MetaOptimizer(tensors, specs, cfg)


def named(g, gl=None):
    """Gradients by learnable name, as MetaOptimizer.step takes them."""
    return {"images": g} if gl is None else {"images": g, "soft_labels": gl}


# ---------------------------------------------------------------------------------------------- a tiny float64 problem

PROBLEM_CLASSES, PROBLEM_IPC, PROBLEM_SIDE = 3, 2, 8
AUG = AugmentConfig(strategies=["flip", "rotate", "crop"])


class DeadParamNet(nn.Module):
    """The registry ConvNet plus a parameter whose inner gradient is exactly 0: Adam's second moment stays 0 for it,
    so a segment start holds v == 0 (safe_sqrt's case) as a leaf that requires grad."""

    def __init__(self):
        super().__init__()
        self.net = create_model("convnet", 3, PROBLEM_CLASSES, PROBLEM_SIDE, width=6, depth=2, norm="instance")
        self.dead = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.net(x) + 0.0 * self.dead.sum()


def convnet():
    return create_model("convnet", 3, PROBLEM_CLASSES, PROBLEM_SIDE, width=6, depth=2, norm="instance").double()


def dead_param_net():
    return DeadParamNet().double()


def make_problem():
    """(images, hard labels, soft labels, real images, real labels) of a tiny float64 problem."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(PROBLEM_CLASSES * PROBLEM_IPC, 3, PROBLEM_SIDE, PROBLEM_SIDE, generator=g,
                         dtype=torch.float64)
    hard = torch.arange(PROBLEM_CLASSES).repeat_interleave(PROBLEM_IPC)
    soft = F.one_hot(hard, PROBLEM_CLASSES).double() * 2.0 + 0.1
    real_x = torch.randn(40, 3, PROBLEM_SIDE, PROBLEM_SIDE, generator=g, dtype=torch.float64)
    real_y = torch.randint(0, PROBLEM_CLASSES, (40,), generator=g)
    return images, hard, soft, real_x, real_y


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------- artifacts, checkpoints


def make_set(ipc: int = 3, classes: int = 4, shape=(3, 5, 6), soft: bool = True, blocks: bool = False) -> DistilledSet:
    gen = torch.Generator().manual_seed(0)
    n = ipc * classes
    labels = torch.arange(classes).repeat(ipc)  # position-major: c0 c1 c2 c3 c0 c1 ...
    metadata = {
        "dataset": "toy",
        "class_names": [f"class{i}" for i in range(classes)],
        "num_classes": classes,
        "ipc": ipc,
        "image_shape": list(shape),
        "normalisation": {"mean": [0.5] * shape[0], "std": [0.25] * shape[0]},
        "zca": False,
        "eval_recipe": "adam",
        "config": config_to_dict(config_from_dict({}, check_paths=False)),
        "code_version": "0.1.0",
    }
    return DistilledSet(
        images=torch.randn(n, *shape, generator=gen),
        labels=labels,
        soft_labels=torch.rand(n, classes, generator=gen) if soft else None,
        blocks=torch.arange(n, dtype=torch.int32) % 2 if blocks else None,
        metadata=metadata,
    )


class Unpickled(Exception):
    """Raised by the patched pickle entry points; deliberately not a ValueError, so nothing can swallow it."""


def forbid_pickle(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise Unpickled("pickle was called during loading")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


# ---------------------------------------------------------------------------------------------- tiny runs

ENGINE_STEPS = 6
# The engine's tiny run: learned labels, a checkpoint every 2 steps, one thread per worker.
ENGINE_TINY = [f"steps={ENGINE_STEPS}", "ipc=1", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2",
               "ratbptt.real_batch=64", "eval.every=0", "threads=1", "ray.worker_threads=1", "ray.cpus_per_worker=1",
               "ray.checkpoint_every=2", "labels.learn=true"]


def engine_config(*more):
    return load_config("quickstart", ENGINE_TINY + list(more))


def images_of(run) -> torch.Tensor:
    return read_distilled(Path(run) / "distilled.parquet").images


def metric_steps(run) -> list[int]:
    """The steps of a run's meta-step records (validation records left out)."""
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "meta_loss" in json.loads(line)]


# The storage tests' tiny in-process run: 8 steps, a checkpoint every 2, three tries per write.
STORAGE_TINY = ["steps=8", "ipc=1", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2", "ratbptt.real_batch=64",
                "eval.every=0", "threads=1", "ray.checkpoint_every=2", "ray.write_retries=3"]
# The watching tests' tiny run: validated at steps 3 and 6, one worker.
WATCH_TINY = ["steps=6", "ipc=1", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2", "ratbptt.real_batch=64",
              "eval.every=3", "eval.val_models=1", "eval.val_steps=5", "data.val_size=200", "ray.checkpoint_every=3",
              "ray.workers=1", "ray.cpus_per_worker=1", "ray.worker_threads=1", "threads=1"]


def tensorboard_events(folder: Path):
    """Every scalar and image of the TensorBoard event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


# ---------------------------------------------------------------------------------------------- evaluation

EVAL_TINY = ["eval.steps=5", "eval.num_models=2", "model.width=8", "data.val_size=100", "eval.val_steps=5",
             "ray.worker_threads=1"]


def eval_config(*overrides: str):
    return load_config("quickstart", [*EVAL_TINY, *overrides])


def stand_in_set(dataset, ipc=1):
    """A stand-in for a distilled set: any images of the right shape do."""
    from raydistill.data.selection import random_real_subset

    return random_real_subset(dataset, ipc, seed=999)


def snapshot_of(dataset, soft: bool) -> dict:
    from raydistill.data.selection import random_real_subset

    images, labels = random_real_subset(dataset, 1, seed=3)
    soft_labels = torch.softmax(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)), 1) if soft else None
    return {"images": images.numpy(), "hard_labels": labels.numpy(),
            "soft_labels": None if soft_labels is None else soft_labels.numpy()}


def expected_validation(snapshot, dataset, cfg) -> float:
    """In-process validation on the whole data set (the validator keeps only the val split)."""
    from raydistill.evaluate.validator import validation_accuracy

    images, hard, soft = (None if snapshot[k] is None else torch.tensor(snapshot[k])
                          for k in ("images", "hard_labels", "soft_labels"))
    return validation_accuracy(images, hard, soft, dataset, cfg, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- real data


def pixels(n: int, c: int = 1, side: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def tiny_dataset(n: int, side: int = 2, classes: int = 4, seed: int = 0):
    from raydistill.data.real import Normaliser, RealImages
    from raydistill.data.registry import Dataset, channel_stats

    px = pixels(n, side=side, seed=seed)
    labels = torch.arange(n) % classes
    norm = Normaliser(*channel_stats(px))
    val = pixels(8, side=side, seed=seed + 1)
    return Dataset("tiny", RealImages(px, norm), labels, RealImages(val, norm), torch.arange(8) % classes,
                   RealImages(val, norm), torch.arange(8) % classes, [str(c) for c in range(classes)],
                   norm.mean.tolist(), norm.std.tolist(), None)


def sharing_config(cache_bytes: float, resample_every: int = 5, seed: int = 0):
    """The quickstart config with a data cache of `cache_bytes` per worker."""
    from raydistill.engine.shared_data import GIB

    return load_config("quickstart", [f"data.cache_gb={cache_bytes / GIB!r}", f"data.resample_every={resample_every}",
                                      f"seed={seed}"], check_paths=False)


# ---------------------------------------------------------------------------------------------- Tune

SWEEP_TINY = {"steps": 6, "ipc": 1, "model.width": 8, "ratbptt.unroll": 4, "ratbptt.window": 2,
              "ratbptt.real_batch": 64, "eval.every": 2, "eval.val_models": 1, "eval.val_steps": 50,
              "ray.checkpoint_every": 2, "ray.cpus_per_worker": 1, "ray.worker_threads": 1, "threads": 1}


def write_sweep(folder: Path, **fields) -> Path:
    searched = fields.get("search", {}) if isinstance(fields.get("search"), dict) else {}
    fixed = fields.pop("set", SWEEP_TINY)
    body = {"name": "tiny", "base": "quickstart", "set": {k: v for k, v in fixed.items() if k not in searched},
            "storage": str(folder / "store"), "max_concurrent_trials": 1, **fields}
    path = folder / f"{body['name'].replace('/', '_')}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def optuna_samples(sweep, count: int) -> list[dict]:
    """The optuna searcher's first `count` proposals, with no scores told."""
    import dataclasses

    from raydistill.tune import make_searcher, search_space

    searcher = make_searcher(dataclasses.replace(sweep, max_concurrent_trials=None))
    assert searcher.set_search_properties(None, None, search_space(sweep))
    return [searcher.suggest(f"trial-{i}") for i in range(count)]


# ---------------------------------------------------------------------------------------------- simulated clusters

SCENARIO_TIMEOUT_S = 240


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_scenario(name: str, out: Path) -> dict:
    """Run one scenario of cluster_scenarios.py to its end; its output is shown when it fails or writes no usable
    result."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # A session (and process group) of its own: GCS, raylets and agents of the simulated cluster are in that group,
    # so a scenario that hangs can be cleaned up without touching anything else.
    proc = subprocess.Popen([sys.executable, str(CLUSTER_SCENARIOS), name, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid, signal.SIGTERM)  # the script's `finally` shuts the cluster down
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"scenario {name} ran past {SCENARIO_TIMEOUT_S} s; its output:\n{output[-6000:]}")
    finally:
        kill_group(proc.pid, signal.SIGKILL)  # anything of the cluster that outlived the script
    result_file = out / "result.json"
    assert result_file.is_file(), f"scenario {name} wrote no result (rc {proc.returncode}):\n{output[-6000:]}"
    result = json.loads(result_file.read_text())
    assert "error" not in result, f"scenario {name} failed:\n{result['error']}\n--- output:\n{output[-6000:]}"
    assert proc.returncode == 0, output[-6000:]
    return result
