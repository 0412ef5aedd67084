"""Real data on workers: uint8 until a batch is drawn, one shared copy, and a seeded subset of shards past cache_gb.

Specification of raydistill.data.real and raydistill.engine.shared_data (the statistical test of equal draw
probabilities is here too; README "Real data on workers" states the rule).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydistill.setup import load_config
from raydistill.data.real import Normaliser, RealImages
from raydistill.data.registry import channel_stats
from raydistill.data.zca import ZCA
from raydistill.engine.backend import BACKENDS
from raydistill.engine.shared_data import GIB, WorkerData, share, shard_plan
from raydistill.engine.worker import GradientWorker

from helpers import pixels, sharing_config, tiny_dataset

LOCAL = BACKENDS["local"]


def old_float_path(px: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """What load_dataset did before: the whole split to float32 [0, 1], then standardised in place."""
    x = px.to(torch.float32).div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


# ---------------------------------------------------------------------------------------------- RealImages


def test_indexing_gives_the_old_float32_values_bit_for_bit():
    px = pixels(50, c=3)
    mean, std = channel_stats(px)
    images = RealImages(px, Normaliser(mean, std))
    old = old_float_path(px, mean, std)
    idx = torch.tensor([7, 3, 3, 49, 0])
    assert images[idx].dtype == torch.float32 and torch.equal(images[idx], old[idx])
    assert torch.equal(images[10:20], old[10:20]) and torch.equal(images.tensor(), old)
    assert torch.equal(images[5], old[5]) and torch.equal(images[:4, 1], old[:4, 1])
    assert images.shape == (50, 3, 4, 4) and len(images) == 50 and images.nbytes == px.numel()


def test_chunks_index_like_one_tensor():
    px = pixels(23, c=2)
    norm = Normaliser(*channel_stats(px))
    one = RealImages(px, norm)
    parts = RealImages([px[:5], px[5:6], px[6:]], norm)
    for index in (torch.tensor([22, 0, 5, 6, 4, 5, -1]), slice(3, 19, 2), [1, 2, 3], slice(None)):
        assert torch.equal(parts[index], one[index]), index
    with pytest.raises(IndexError):
        parts[torch.tensor([23])]
    with pytest.raises(ValueError, match="uint8"):
        RealImages([px.float()], norm)


def test_channel_stats_are_exact():
    px = pixels(300, c=3, side=5, seed=4)
    mean, std = channel_stats(px, block=64 * 25)  # several blocks
    ref_std, ref_mean = torch.std_mean(px.double() / 255, dim=(0, 2, 3))
    assert torch.allclose(mean.double(), ref_mean, rtol=0, atol=1e-7)
    assert torch.allclose(std.double(), ref_std, rtol=0, atol=1e-7)
    constant = torch.full((4, 1, 2, 2), 7, dtype=torch.uint8)
    assert channel_stats(constant)[1].item() == 1.0  # a constant channel is centred, not divided by zero


def test_normaliser_round_trips_through_plain_arrays_with_zca():
    px = pixels(40, side=3, seed=2)
    mean, std = channel_stats(px)
    plain = Normaliser(mean, std)
    norm = Normaliser(mean, std, ZCA.fit(plain(px), 0.1))
    back = Normaliser.from_arrays({k: np.array(v) for k, v in norm.to_arrays().items()})
    assert torch.equal(back(px), norm(px))
    assert torch.allclose(norm(px), norm.zca.transform(plain(px)), atol=1e-6)


# ---------------------------------------------------------------------------------------------- sharing


def test_shard_plan_keeps_a_worker_within_its_cache():
    assert shard_plan(55000, 784, 8.0) == (1, 1)  # the quickstart set: everything, one object
    for n, per_image, cache_gb in ((60000, 3 * 128 * 128, 1.0), (1_281_167, 3 * 64 * 64, 8.0), (600, 4, 800 / GIB)):
        shards, hold = shard_plan(n, per_image, cache_gb)
        assert 1 <= hold < shards <= n
        assert hold * math.ceil(n / shards) * per_image <= cache_gb * GIB
        assert hold >= 3  # a worker mixes several random shards


def test_past_the_cache_shards_partition_the_training_split():
    ds = tiny_dataset(103)
    shared = share(ds, sharing_config(cache_bytes=100), LOCAL)  # 412 bytes of pixels, 100 of cache
    assert shared.num_shards > 1 and 1 <= shared.hold < shared.num_shards
    assert max(shared.train_rows) - min(shared.train_rows) <= 1 and shared.num_train == 103
    ids = np.concatenate([LOCAL.get(r)["ids"] for r in shared.train])
    assert sorted(ids.tolist()) == list(range(103))  # every image in exactly one shard
    for ref in shared.train:
        part = LOCAL.get(ref)
        assert np.array_equal(part["pixels"], ds.train_x.pixels(torch.from_numpy(part["ids"])).numpy())
        assert np.array_equal(part["labels"], ds.train_y[torch.from_numpy(part["ids"])].numpy())


def test_held_shards_are_a_pure_function_of_seed_slot_and_epoch():
    shared = share(tiny_dataset(200), sharing_config(cache_bytes=200, resample_every=5), LOCAL)
    assert shared.held_shards(3, 1) == shared.held_shards(4, 1) == share(
        tiny_dataset(200), sharing_config(cache_bytes=200, resample_every=5), LOCAL).held_shards(0, 1)
    epochs = {tuple(shared.held_shards(5 * e, 0)) for e in range(20)}
    slots = {tuple(shared.held_shards(0, s)) for s in range(20)}
    assert len(epochs) > 5 and len(slots) > 5
    assert all(len(h) == shared.hold == len(set(h)) for h in epochs | slots)


def chi_square_bound(dof: int, z: float = 3.72) -> float:
    """The (1 - 1e-4) quantile of chi-square(dof), Wilson-Hilferty approximation (z: the normal 1e-4 quantile)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def draw_counts(shared, workers: int, steps: int, batch: int) -> np.ndarray:
    """How often each training image is drawn when `workers` slots draw `batch` images a step, as a method does:
    a uniform random batch of the images the slot holds."""
    views = [WorkerData(shared, LOCAL, torch.device("cpu")) for _ in range(workers)]
    rng = torch.Generator().manual_seed(1)
    counts = np.zeros(shared.num_train, dtype=np.int64)
    for step in range(steps):
        for slot, view in enumerate(views):
            held, _ = view.at(step, slot)
            pick = torch.randperm(len(held.images), generator=rng)[:batch]
            np.add.at(counts, held.ids[pick].numpy(), 1)
    return counts


def test_every_image_is_drawn_with_equal_probability_over_workers_and_steps():
    n, workers, steps, batch = 600, 3, 2000, 10
    shared = share(tiny_dataset(n), sharing_config(cache_bytes=800, resample_every=5), LOCAL)
    assert (shared.num_shards, shared.hold) == (12, 4)  # shards of 50 images; a worker holds 4 of them
    counts = draw_counts(shared, workers, steps, batch)
    expected = workers * steps * batch / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_bound(n - 1), chi2
    # The same test rejects a sampler that never changes what each worker holds (only 3 x 4 of 12 shards ever
    # seen, and overlapping): it is not vacuous.
    frozen = share(tiny_dataset(n), sharing_config(cache_bytes=800, resample_every=10**9), LOCAL)
    stuck = draw_counts(frozen, workers, 200, batch)
    expected = workers * 200 * batch / n
    assert float(((stuck - expected) ** 2 / expected).sum()) > chi_square_bound(n - 1)


def test_a_worker_sets_its_method_up_again_when_its_shards_change(monkeypatch):
    ds = tiny_dataset(120, side=28, classes=10)
    cfg = load_config("quickstart", ["data.cache_gb=0.00004", "data.resample_every=2", "ratbptt.real_batch=8",
                                     "ratbptt.unroll=2", "ratbptt.window=1", "model.width=8", "eval.every=0"],
                      check_paths=False)
    shared = share(ds, cfg, LOCAL)
    assert shared.num_shards > shared.hold
    worker = GradientWorker(cfg, "local")
    worker.attach(shared)
    seen = []
    for step in range(6):
        worker.hold(step, 0)
        ctx = worker.context
        held = sorted(worker.data.held.ids.tolist())
        assert len(ctx.real_x) == len(held) and torch.equal(ctx.real_y.sort().values,
                                                            ds.train_y[torch.tensor(held)].sort().values)
        assert torch.equal(ctx.real_x.pixels(slice(None)), ds.train_x.pixels(worker.data.held.ids))
        seen.append(tuple(held))
    assert seen[0] == seen[1] and seen[2] == seen[3] and len(set(seen)) > 1
