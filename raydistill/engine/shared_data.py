"""Real data on the actors: loaded once by the driver, one uint8 copy per node, bounded memory per worker.

The driver loads the data set (decoding an image folder or reading a prepared set once) and puts the training
split into Ray's object store as uint8 arrays. A worker reads them in place: every worker on a node maps the same
copy (Ray moves an object to a node once, the first time a process there asks for it), and converts only the batch
it draws to normalised float32 (raydistill.data.real). The validator gets the validation split the same way.

Past `data.cache_gb`, a worker does not hold the whole training split. The driver cuts it into S shards of equal
size (rows differ by at most one), each a random sample of the images (a seeded permutation, so every shard mixes
all classes), S = ceil(4 x split size / cache_gb). A worker slot holds `hold` = floor(cache_gb / shard size) of
them, a uniformly random subset drawn afresh every `data.resample_every` meta-steps from (run seed, slot, epoch),
and draws its real batches uniformly from the images it holds. An image is then drawn with the same probability
by every slot at every step: its shard is held with probability hold / S, and a held image is one of hold x n
equally likely ones, so P = (hold / S) x 1 / (hold x n) = 1 / (S x n) = 1 / N (for shards of exactly n rows; with
N not a multiple of S, shards of n and n + 1 rows make the probabilities differ by at most a factor (n + 1) / n).
The held set is a pure function of (seed, slot, step), so a retried task draws from the same images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raydistill.config import DistillConfig
from raydistill.data.real import Normaliser, RealImages, pixels_from_numpy
from raydistill.data.registry import Dataset
from raydistill.engine.backend import Ready

GIB = 1 << 30
SHARDS_PER_CACHE = 4  # past cache_gb, shards are cut at a quarter of the cache: a worker holds about four


@dataclass
class SharedData:
    """What the driver hands every worker and the validator: small metadata plus object refs to the arrays."""

    name: str
    class_names: list[str]
    mean: list[float]
    std: list[float]
    normaliser: Any  # ref -> Normaliser.to_arrays()
    train: list[Any]  # refs -> {"pixels": uint8 (n, C, H, W), "labels": int64 (n,), "ids": int64 (n,)}
    train_rows: list[int]
    val: Any  # ref -> {"pixels", "labels"}
    hold: int  # shards a worker holds at a time (len(train) when the split fits in cache_gb)
    resample_every: int
    seed: int

    @property
    def num_shards(self) -> int:
        return len(self.train)

    @property
    def num_train(self) -> int:
        return sum(self.train_rows)

    def held_shards(self, step: int, slot: int) -> list[int]:
        """The shards slot `slot` holds at meta-step `step`: all of them, or a seeded uniform subset per epoch."""
        if self.hold >= self.num_shards:
            return list(range(self.num_shards))
        epoch = step // self.resample_every
        rng = np.random.default_rng([self.seed, slot, epoch])
        return sorted(int(s) for s in rng.choice(self.num_shards, size=self.hold, replace=False))


def shard_plan(num_train: int, bytes_per_image: int, cache_gb: float) -> tuple[int, int]:
    """(S shards, shards held per worker) for a training split of `num_train` images."""
    total = num_train * bytes_per_image
    cache = cache_gb * GIB
    if total <= cache or num_train < 2:
        return 1, 1
    shards = min(num_train, math.ceil(SHARDS_PER_CACHE * total / cache))
    largest = math.ceil(num_train / shards) * bytes_per_image
    return shards, max(1, min(shards - 1, int(cache // largest)))


def share(dataset: Dataset, cfg: DistillConfig, backend) -> SharedData:
    """Put the data set's training and validation splits where the run's actors read them (Ray's object store, or
    this process for the in-process backend: no copy)."""
    put = backend.put if backend.name == "ray" else Ready
    train_x, val_x = dataset.train_x, dataset.val_x
    if not isinstance(train_x, RealImages) or not isinstance(val_x, RealImages):
        raise TypeError("share() needs a data set whose splits are uint8 RealImages (raydistill.data.load_dataset)")
    pixels = train_x.pixels(slice(None))
    labels = dataset.train_y
    n = len(labels)
    shards, hold = shard_plan(n, pixels[0].numel() if n else 0, cfg.data.cache_gb)
    if shards == 1:
        order = torch.arange(n)
    else:  # a seeded permutation: each shard is a random sample of the images, so it mixes every class
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    refs, rows = [], []
    for part in order.tensor_split(shards):
        chunk = pixels if shards == 1 else pixels[part]
        refs.append(put({"pixels": chunk.numpy(), "labels": labels[part].numpy(), "ids": part.numpy()}))
        rows.append(len(part))
    val = put({"pixels": val_x.pixels(slice(None)).numpy(), "labels": dataset.val_y.numpy()})
    return SharedData(
        name=dataset.name, class_names=list(dataset.class_names), mean=list(dataset.mean), std=list(dataset.std),
        normaliser=put(train_x.normaliser.to_arrays()), train=refs, train_rows=rows, val=val, hold=hold,
        resample_every=cfg.data.resample_every, seed=cfg.seed,
    )


def shared_normaliser(shared: SharedData, backend) -> Normaliser:
    return Normaliser.from_arrays(backend.get(shared.normaliser))


@dataclass
class HeldData:
    """The training images one worker slot holds: normalised-on-read images, labels, and their rows in the split."""

    images: RealImages
    labels: torch.Tensor
    ids: torch.Tensor


class WorkerData:
    """A worker's view of SharedData: the arrays are read in place from the object store (no copy on the CPU; one
    uint8 copy on a GPU), re-read only when the held shards change."""

    def __init__(self, shared: SharedData, backend, device: torch.device):
        self.shared, self.backend, self.device = shared, backend, device
        self.normaliser = shared_normaliser(shared, backend)
        self.key: tuple[int, ...] | None = None
        self.held: HeldData | None = None

    def at(self, step: int, slot: int) -> tuple[HeldData, bool]:
        """(what slot `slot` holds at `step`, whether that changed since the last call)."""
        key = tuple(self.shared.held_shards(step, slot))
        if key == self.key:
            return self.held, False
        self.held = None  # drop the old views before mapping the new ones
        parts = [self.backend.get(self.shared.train[s]) for s in key]
        images = RealImages([pixels_from_numpy(p["pixels"]) for p in parts], self.normaliser).to(self.device)
        labels = torch.cat([torch.from_numpy(np.array(p["labels"])) for p in parts]).to(self.device)
        ids = torch.cat([torch.from_numpy(np.array(p["ids"])) for p in parts])
        self.key, self.held = key, HeldData(images, labels, ids)
        return self.held, True

    def dataset_info(self) -> tuple[int, tuple[int, int, int]]:
        first = self.backend.get(self.shared.train[0])["pixels"]
        return len(self.shared.class_names), tuple(first.shape[1:])


def validation_split(shared: SharedData, backend, device: torch.device) -> tuple[RealImages, torch.Tensor]:
    """The validation images (uint8, normalised on read) and labels, on `device`."""
    normaliser = shared_normaliser(shared, backend)
    val = backend.get(shared.val)
    return (RealImages(pixels_from_numpy(val["pixels"]), normaliser).to(device),
            torch.from_numpy(np.array(val["labels"])).to(device))
