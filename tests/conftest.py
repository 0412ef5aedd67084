"""Fixtures, and the tier of every test: the folder a test file is in (unit/, integration/, e2e/) is its marker.

One Ray instance for the whole test session (ray.init costs ~5 s and ~0.7 GB), started on first use. Helpers that
test files share are in helpers/ (`from helpers import ...`), never in this file.
"""

import logging
import os
from pathlib import Path

import pytest

from raydistill.compat import loopback_init_kwargs

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests bind every Ray to 127.0.0.1; this keeps Ray from "resolving" a loopback address to the machine's own IP when
# a subprocess joins the session's Ray (it does that only where multi-node clusters are enabled).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray's worker processes import plug-in methods defined under this folder (helpers.toy_method) by name, as a
# cluster's nodes would import an installed package.
TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)

TIERS = ("unit", "integration", "e2e")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    """Marks every test with its folder's tier, and runs the tiers in order: the unit tests first, without the
    session's Ray running beside them (it starts with the first test that needs it)."""
    here = Path(__file__).resolve().parent
    rank = {}
    for item in items:
        parts = Path(item.path).resolve().relative_to(here).parts
        tier = parts[0] if len(parts) > 1 and parts[0] in TIERS else None
        if tier:
            item.add_marker(tier)
        rank[item.nodeid] = TIERS.index(tier) if tier else len(TIERS)
    items.sort(key=lambda item: rank[item.nodeid])  # stable: each file keeps its order


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, logging_level=logging.WARNING,
             **loopback_init_kwargs())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fashion():
    """Fashion-MNIST with its training and test splits cut short, so every network and coreset is quick. (Test files
    that need the whole data set define a `fashion` fixture of their own.)"""
    import dataclasses

    from helpers import eval_config
    from raydistill.data.registry import load_dataset

    full = load_dataset(eval_config().data)
    return dataclasses.replace(full, train_x=full.train_x[:3000], train_y=full.train_y[:3000],
                               test_x=full.test_x[:500], test_y=full.test_y[:500])


@pytest.fixture
def one_thread():
    """Numbers on CPU depend on the torch thread count: compare runs at the count the Ray tasks use."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
