"""One Ray instance for the whole test session (ray.init costs ~5 s and ~0.7 GB), started on first use."""

import logging
import os

import pytest

from raydistill.compat import loopback_init_kwargs
from raydistill.methods.base import Learnable
from raydistill.synset.meta_update import MetaOptimizer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests bind every Ray to 127.0.0.1; this keeps Ray from "resolving" a loopback address to the machine's own IP when
# a subprocess joins the session's Ray (it does that only where multi-node clusters are enabled).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray's worker processes import plug-in methods defined in this folder (toy_method.py) by name, as a cluster's
# nodes would import an installed package.
TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)

FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION), reason="needs dataset-fashion-mnist")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, logging_level=logging.WARNING,
             **loopback_init_kwargs())
    yield ray
    ray.shutdown()


def make_meta(images, soft, cfg):
    """A MetaOptimizer over the standard learnables: images, and soft labels when given."""
    tensors, specs = {"images": images}, {"images": Learnable()}
    if soft is not None:
        tensors["soft_labels"], specs["soft_labels"] = soft, Learnable(lr_scale=cfg.label_lr_scale, clamp_min=0.0)
    return MetaOptimizer(tensors, specs, cfg)


def named(g, gl=None):
    """Gradients by learnable name, as MetaOptimizer.step takes them."""
    return {"images": g} if gl is None else {"images": g, "soft_labels": gl}
