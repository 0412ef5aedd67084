"""The private Ray and torch internals raydistill relies on (raydistill.compat) still exist and behave as relied on.

One test per entry of `raydistill.compat.INTERNALS`; each failure says which internal changed, the version it was
checked against, and what raydistill uses it for. None of these tests starts Ray.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raydistill import compat
from raydistill.compat import INTERNALS


def entry(name: str) -> compat.Internal:
    """The INTERNALS entry a test checks (the last test reads these calls to see that every entry has one)."""
    return INTERNALS[name]


# What Ray 2.60 printed on a driver's stdout when a worker was SIGKILLed mid-task (colour codes included): one line.
RAY_WORKER_DIED_SAMPLE = (
    "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system error. To "
    "troubleshoot the problem, check the logs for the dead worker. Lease ID: 0200 Worker ID: 39b3 Node ID: 1d95 "
    "Worker IP address: 127.0.0.1 Worker port: 33151 Worker PID: 13919 Worker exit type: SYSTEM_ERROR Worker exit "
    "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) "
    "the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the "
    "worker crashed unexpectedly due to SIGSEGV or another unexpected error.")


# -------------------------------------------------------------------------------------------------------------- Ray


def test_enable_ray_cluster_is_a_bool_that_keeps_loopback():
    e = entry("ray._private.ray_constants.ENABLE_RAY_CLUSTER")
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services

    assert isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), bool), e.changed("no longer a bool constant")
    before = ray_constants.ENABLE_RAY_CLUSTER
    with compat.loopback_only(True):
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        resolved = services.resolve_ip_for_localhost(compat.LOOPBACK)
        assert resolved == compat.LOOPBACK, e.changed(f"with it False, Ray still resolves 127.0.0.1 to {resolved}")
    assert ray_constants.ENABLE_RAY_CLUSTER is before
    with compat.loopback_only(False):
        assert ray_constants.ENABLE_RAY_CLUSTER is before


def test_ray_init_takes_node_ip_address():
    e = entry("ray.init(_node_ip_address=...)")
    import ray

    assert compat.loopback_init_kwargs() == {"_node_ip_address": "127.0.0.1"}
    params = inspect.signature(ray.init).parameters
    (name,) = compat.loopback_init_kwargs()
    takes = name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert takes, e.changed("ray.init takes neither it nor **kwargs")
    source = inspect.getsource(ray.init)
    assert name in params or re.search(rf"kwargs\.pop\(\s*[\"']{name}[\"']", source), \
        e.changed("ray.init no longer reads it from its **kwargs")


def test_the_console_patterns_match_rays_dead_worker_message():
    e = entry("the raylet's dead-worker message")
    assert compat.RAY_WORKER_DIED in RAY_WORKER_DIED_SAMPLE
    assert compat.RAY_WORKER_PID.search(RAY_WORKER_DIED_SAMPLE).group(1) == "13919"
    assert compat.RAY_WORKER_EXIT.search(RAY_WORKER_DIED_SAMPLE).group(1) == "SYSTEM_ERROR"
    from raydistill.watch.console import condense

    assert condense(RAY_WORKER_DIED_SAMPLE).startswith("(raylet) a worker process died (PID 13919, SYSTEM_ERROR)")
    # The message is the raylet's (C++): its wording must still be in the installed raylet binary.
    import ray

    raylets = sorted((Path(ray.__file__).parent / "core" / "src" / "ray" / "raylet").glob("raylet*"))
    assert raylets, e.changed("no raylet binary under ray/core/src/ray/raylet to read the message from")
    binary = raylets[0].read_bytes()
    for text in (compat.RAY_WORKER_DIED, "Worker PID: ", "Worker exit type: "):
        assert text.encode() in binary, e.changed(f"{text!r} is no longer in {raylets[0].name}")


def test_ray_reads_the_colour_prefix_variable():
    e = entry("RAY_COLOR_PREFIX")
    import ray._private.worker as worker

    source = Path(worker.__file__).read_text()
    assert re.search(rf"getenv\(\s*[\"']{compat.RAY_COLOR_PREFIX}[\"']\s*\)\s*==\s*[\"']0[\"']", source), \
        e.changed("Ray's driver no longer leaves out colour codes when it is \"0\" (ray/_private/worker.py)")


@pytest.mark.parametrize("name", compat.RAY_TRAIN_STORAGE_LOGGERS)
def test_the_quieted_loggers_are_ray_trains(name):
    e = entry("ray.train._internal storage loggers")
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise AssertionError(e.changed(f"module {name} is gone ({exc})")) from None
    loggers = [v for v in vars(module).values() if isinstance(v, logging.Logger)]
    assert any(log.name == name for log in loggers), e.changed(f"{name} no longer logs under its module name")


def test_node_classes_start_a_node_as_the_job_test_does():
    e = entry("ray._private.node.Node / ray._private.parameter.RayParams")
    try:
        node, params = compat.ray_node_classes()
    except ImportError as exc:
        raise AssertionError(e.changed(f"import failed ({exc})")) from None
    wanted = {"node_ip_address", "gcs_address", "num_cpus", "num_gpus", "object_store_memory", "include_log_monitor",
              "node_manager_port", "min_worker_port", "max_worker_port", "dashboard_agent_listen_port"}
    missing = wanted - set(inspect.signature(params).parameters)
    assert not missing, e.changed(f"RayParams lost {sorted(missing)}")
    built = params(node_ip_address="127.0.0.1", gcs_address="127.0.0.1:1", num_cpus=1, num_gpus=0,
                   object_store_memory=80 * 2**20, include_log_monitor=False, node_manager_port=0, min_worker_port=0,
                   max_worker_port=0, dashboard_agent_listen_port=None)
    assert built.node_ip_address == "127.0.0.1"
    missing = {"ray_params", "head", "shutdown_at_exit", "spawn_reaper"} - set(inspect.signature(node).parameters)
    assert not missing, e.changed(f"Node() lost {sorted(missing)}")


def test_the_dashboard_dependency_helper_exists():
    e = entry("ray._private.utils.get_dashboard_dependency_error")
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError as exc:
        raise AssertionError(e.changed(f"import failed ({exc})")) from None
    assert not inspect.signature(get_dashboard_dependency_error).parameters, e.changed("it now takes arguments")
    error = compat.dashboard_dependency_error()
    assert error is None or isinstance(error, str)


def test_the_autoscaler_config_checks_exist():
    e = entry("ray.autoscaler._private.util.prepare_config / validate_config")
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:
        raise AssertionError(e.changed(f"import failed ({exc})")) from None
    for fn in (prepare_config, validate_config):
        assert len(inspect.signature(fn).parameters) == 1, e.changed(f"{fn.__name__} no longer takes one config")
    with pytest.raises(Exception):  # an empty config is not a launcher file: Ray's validator says so
        compat.validate_cluster_config({})


# ------------------------------------------------------------------------------------------------------------ torch


def test_the_interpreter_stack_tells_torch_func_transforms():
    e = entry("torch._C._functorch.peek_interpreter_stack")
    try:
        outside = compat.under_func_transform()
    except AttributeError as exc:
        raise AssertionError(e.changed(f"gone ({exc})")) from None
    assert outside is False, e.changed("not None outside every transform")
    seen = []

    def probe(t):
        seen.append(compat.under_func_transform())
        return t.sum()

    torch.func.vmap(probe)(torch.zeros(2, 3))
    torch.func.grad(probe)(torch.zeros(3))
    assert seen == [True, True], e.changed(f"inside vmap / grad it says {seen} (want not None)")


def group_norm_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    return x, torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)


def test_native_group_norm_is_group_norm():
    e = entry("torch.ops.aten.native_group_norm")
    x, w, b = group_norm_input()
    try:
        y, mean, rstd = compat.native_group_norm(x, w, b, 2, 3, 20, 3, 1e-5)
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        raise AssertionError(e.changed(f"the call failed ({exc})")) from None
    assert mean.shape == rstd.shape == (2, 3), e.changed(f"mean and rstd are {tuple(mean.shape)}, not (N, groups)")
    torch.testing.assert_close(y, F.group_norm(x, 3, w, b, 1e-5), rtol=1e-12, atol=1e-12,
                               msg=lambda m: e.changed(f"its value is not F.group_norm's: {m}"))
    torch.testing.assert_close(mean, x.mean((2, 3)), rtol=1e-12, atol=1e-12,
                               msg=lambda m: e.changed(f"its mean is not the spatial mean: {m}"))
    var = x.var((2, 3), unbiased=False)
    torch.testing.assert_close(rstd, (var + 1e-5).rsqrt(), rtol=1e-12, atol=1e-12,
                               msg=lambda m: e.changed(f"its rstd is not 1/sqrt(var + eps): {m}"))


def test_native_group_norm_backward_is_autograd_of_group_norm():
    e = entry("torch.ops.aten.native_group_norm_backward")
    x, w, b = group_norm_input()
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    y = F.group_norm(x, 3, w, b, 1e-5)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    truth = torch.autograd.grad(y, (x, w, b), gy)
    with torch.no_grad():
        _, mean, rstd = compat.native_group_norm(x, w, b, 2, 3, 20, 3, 1e-5)
        try:
            ours = compat.native_group_norm_backward(gy, x, mean, rstd, w, 2, 3, 20, 3, [True, True, True])
        except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
            raise AssertionError(e.changed(f"the call failed ({exc})")) from None
    for what, a, t in zip(("gx", "dweight", "dbias"), ours, truth):
        torch.testing.assert_close(a, t, rtol=1e-12, atol=1e-12,
                                   msg=lambda m, what=what: e.changed(f"its {what} is not autograd's: {m}"))


def test_slow_conv2d_forward_is_conv2d_with_derivatives():
    e = entry("torch.ops.aten._slow_conv2d_forward")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    try:
        y = compat.slow_conv2d_forward(x, w, (3, 3), b, (2, 1), (1, 0))
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        raise AssertionError(e.changed(f"the call failed ({exc})")) from None
    ref = F.conv2d(x, w, b, stride=(2, 1), padding=(1, 0))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12, msg=lambda m: e.changed(f"not F.conv2d's value: {m}"))
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for a, t in zip(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(ref, (x, w, b), gy)):
        torch.testing.assert_close(a, t, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: e.changed(f"its derivative is not F.conv2d's: {m}"))
    assert torch.autograd.gradgradcheck(lambda *a: compat.slow_conv2d_forward(*a[:2], (3, 3), a[2], (1, 1), (1, 1)),
                                        (x, w, b)), e.changed("no second derivative")


def test_a_dispatch_mode_sees_forward_and_backward_ops():
    e = entry("torch.utils._python_dispatch.TorchDispatchMode")
    try:
        base = compat.dispatch_mode_base()
    except (AttributeError, ImportError) as exc:
        raise AssertionError(e.changed(f"gone ({exc})")) from None
    seen = []

    class Record(base):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.ones(3, requires_grad=True)
    with Record():
        (x * x).sum().backward()
    assert any("mul" in op for op in seen), e.changed(f"the forward's ops were not seen ({seen})")
    assert len([op for op in seen if "mul" in op]) >= 2, e.changed("the backward's ops were not seen")


# ------------------------------------------------------------------------------------------------------ the module


def test_every_entry_has_a_test_and_says_what_it_is_for():
    """Every INTERNALS entry is checked by a test above, and its failure message names it, the version it was
    checked against and its use."""
    checked = set(re.findall(r'entry\("([^"]+)"\)', Path(__file__).read_text()))
    assert checked == set(INTERNALS), f"entries without a test: {sorted(set(INTERNALS) - checked)}"
    for e in INTERNALS.values():
        assert e.library in ("ray", "torch") and e.purpose and re.fullmatch(r"\d+\.\d+\.\d+", e.checked)
        message = e.changed("gone")
        assert e.name in message and e.checked in message and e.purpose in message
