"""Real data on Ray: workers read the object store's copy of the pixels in place, and a sharded run on Ray equals
the in-process run (the rules themselves: tests/unit/test_real_data.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import sharing_config, tiny_dataset
from raydistill.engine.backend import BACKENDS
from raydistill.engine.shared_data import GIB, WorkerData, share
from raydistill.setup import load_config


def test_on_ray_workers_read_the_object_store_copy_in_place(ray_session):
    import ray

    ds = tiny_dataset(64, side=8)
    shared = share(ds, sharing_config(cache_bytes=GIB), BACKENDS["ray"])

    @ray.remote(num_cpus=0)
    def probe(shared):
        view = WorkerData(shared, BACKENDS["ray"], torch.device("cpu"))
        held, _ = view.at(0, 0)
        array = ray.get(shared.train[0])["pixels"]
        chunk = held.images.chunks[0]
        return (not array.flags.writeable, chunk.data_ptr() == array.ctypes.data, chunk.dtype == torch.uint8,
                torch.equal(held.images[:], ds.train_x[:]))

    assert ray.get(probe.remote(shared)) == (True, True, True, True)


FASHION_ROOT = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not __import__("os").path.isdir(FASHION_ROOT), reason="needs dataset-fashion-mnist")
def test_a_sharded_run_on_ray_equals_the_in_process_run(ray_session, tmp_path):
    from raydistill.engine.driver import distill
    from raydistill.storage.artifact import read_distilled

    tiny = ["steps=4", "model.width=8", "ratbptt.unroll=4", "ratbptt.window=2", "eval.every=0", "data.val_size=200",
            "ratbptt.real_batch=64", "ray.cpus_per_worker=1", "ray.workers=2", "threads=1", "ray.worker_threads=1",
            "data.cache_gb=0.01", "data.resample_every=2"]  # 43 MB of training pixels: 17 shards, 3 held a worker
    local = distill(load_config("quickstart", tiny), tmp_path / "local", in_process=True, progress=False,
                    evaluate=False)
    remote = distill(load_config("quickstart", tiny), tmp_path / "ray", progress=False, evaluate=False)
    assert local["status"]["applied_steps"] == remote["status"]["applied_steps"] == [0, 1, 2, 3]
    assert torch.equal(read_distilled(tmp_path / "local").images, read_distilled(tmp_path / "ray").images)
