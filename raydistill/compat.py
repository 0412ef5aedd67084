"""Every private Ray and torch internal raydistill relies on, fenced in one module.

Each entry in `INTERNALS` names one internal, the version it was checked against and what raydistill uses it for;
the module's accessors below are the only code that touches it. `test_compat.py` (in the tests) has one test per
entry that fails with that entry's `changed(...)` message when an upgrade removes or changes it. Nothing else in the
package or its tests names these internals (`test_layout.py` checks the source text).

Ray is imported lazily (inside the accessors): the torch side is used by the network layers, which must not pull in
Ray; the Ray side only where Ray is about to be used anyway.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LOOPBACK = "127.0.0.1"
RAY_CHECKED = "2.60.0"  # the Ray every Ray entry was checked against
TORCH_CHECKED = "2.14.1"  # the torch every torch entry was checked against (2.14.1+cu130)


@dataclass(frozen=True)
class Internal:
    """One private internal: its name as the library spells it, the library, and what raydistill uses it for."""

    name: str
    library: str  # "ray" or "torch"
    purpose: str

    @property
    def checked(self) -> str:
        return RAY_CHECKED if self.library == "ray" else TORCH_CHECKED

    def changed(self, what: str) -> str:
        """The message of a compatibility test that found this internal changed: which, how, and what it breaks."""
        if self.library == "ray":
            import ray

            installed = ray.__version__
        else:
            installed = torch.__version__
        return (f"{self.library} internal {self.name} changed: {what} (installed {self.library} {installed}, checked "
                f"against {self.checked}). raydistill uses it {self.purpose}. Adapt raydistill/compat.py to the "
                f"installed {self.library} (or pin {self.library}=={self.checked}).")


INTERNALS: dict[str, Internal] = {entry.name: entry for entry in (
    Internal("ray._private.ray_constants.ENABLE_RAY_CLUSTER", "ray",
             "to keep a local Ray on 127.0.0.1 while ray.init starts it (loopback_only)"),
    Internal("ray.init(_node_ip_address=...)", "ray",
             "to start or join a local Ray on 127.0.0.1 (loopback_init_kwargs: raydistill.runtime.connect, the "
             "tests' and benchmarks' local Rays)"),
    Internal("the raylet's dead-worker message", "ray",
             "to shorten a dead worker's paragraph to one line with its PID and exit type (raydistill.watch.console)"),
    Internal("RAY_COLOR_PREFIX", "ray",
             "to keep colour codes out of the driver's Ray lines when the output is not a terminal "
             "(raydistill.watch.console)"),
    Internal("ray.train._internal storage loggers", "ray",
             "to quiet Tune's per-report checkpoint notices in every trial (raydistill.tune.trial)"),
    Internal("ray._private.node.Node / ray._private.parameter.RayParams", "ray",
             "in the tests, to start a second Ray node on 127.0.0.1 (ray_node_classes, tests/e2e/test_job_submit.py)"),
    Internal("ray._private.utils.get_dashboard_dependency_error", "ray",
             "in the tests, to say which dashboard dependency is missing (dashboard_dependency_error)"),
    Internal("ray.autoscaler._private.util.prepare_config / validate_config", "ray",
             "in the tests, to check the shipped cluster launcher files with Ray's own validator"),
    Internal("torch._C._functorch.peek_interpreter_stack", "torch",
             "to tell when a layer runs inside torch.func (vmap, grad), where the custom autograd Functions of "
             "raydistill.models.layers have no rules and the native ops run instead (under_func_transform)"),
    Internal("torch.ops.aten.native_group_norm", "torch",
             "for the value, mean and rstd of raydistill's instance norm (raydistill.models.layers)"),
    Internal("torch.ops.aten.native_group_norm_backward", "torch",
             "for the first derivative of raydistill's instance norm, whose own backward is analytic "
             "(raydistill.models.layers)"),
    Internal("torch.ops.aten._slow_conv2d_forward", "torch",
             "for ATen's im2col convolution of single-input-channel first layers on the CPU, faster there than "
             "oneDNN's (raydistill.models.layers.Conv2d)"),
    Internal("torch.utils._python_dispatch.TorchDispatchMode", "torch",
             "to see every ATen op one rehearsed gradient task runs on the meta device and count the bytes its "
             "results hold (raydistill.memory, the memory planner)"),
)}


# -------------------------------------------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def loopback_only(enabled: bool):
    """Keep Ray from rewriting 127.0.0.1 to this machine's network address while it starts or joins.

    Ray "resolves" a loopback node address to a remotely reachable one wherever multi-node clusters are enabled
    (ray_constants.ENABLE_RAY_CLUSTER, the switch behind RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER); with the node on
    127.0.0.1 its GCS, raylet and workers then listen on loopback only. Once the node exists Ray asks it for its
    address, so the switch is needed only during ray.init.
    """
    if not enabled:
        yield
        return
    import ray._private.ray_constants as ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def loopback_init_kwargs() -> dict[str, Any]:
    """The keyword arguments of `ray.init` that put this driver's node on 127.0.0.1 (`_node_ip_address`, a keyword
    `ray.init` takes from its **kwargs); with `loopback_only` for a Ray started here."""
    return {"_node_ip_address": LOOPBACK}


# The raylet's notice (its C++ source, printed on the driver's stdout) when a worker dies mid-task, as Ray 2.60
# prints it: "(raylet) A worker died or was killed while executing a task by an unexpected system error. ...
# Worker PID: 13919 Worker exit type: SYSTEM_ERROR Worker exit detail: ..." (the whole paragraph is one line).
RAY_WORKER_DIED = "A worker died or was killed while executing a task"
RAY_WORKER_PID = re.compile(r"Worker PID: (\d+)")
RAY_WORKER_EXIT = re.compile(r"Worker exit type: (\w+)")
# The environment variable Ray's driver reads before it prefixes forwarded lines: "0" leaves out the colour codes.
RAY_COLOR_PREFIX = "RAY_COLOR_PREFIX"

# Ray Train's storage modules log a line for every checkpoint Tune reports (V1 and V2 implementations); these are
# their module loggers' names.
RAY_TRAIN_STORAGE_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")


def ray_node_classes() -> tuple[type, type]:
    """(Node, RayParams): what ray.cluster_utils starts a node with; `Node(RayParams(...), head=False)` adds a node
    to a running cluster on 127.0.0.1, which `ray start` refuses to do (tests only)."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    return Node, RayParams


def dashboard_dependency_error() -> str | None:
    """Why Ray's dashboard (and so its job API) cannot start here, or None when it can (or this Ray cannot say)."""
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:  # a Ray without the helper: assume the dashboard works (test_compat.py reports the change)
        return None
    error = get_dashboard_dependency_error()
    return None if error is None else str(error)


def prepare_cluster_config(config: dict) -> dict:
    """A cluster launcher config merged with its provider's defaults, as `ray up` prepares it (no cloud is called)."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(config)


def validate_cluster_config(config: dict) -> None:
    """Ray's own check of a prepared launcher config (ray-schema.json and its cross-field rules); raises if invalid."""
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


# ------------------------------------------------------------------------------------------------------------ torch


def under_func_transform() -> bool:
    """True inside torch.func transforms (vmap, grad): functorch's interpreter stack is not empty."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def native_group_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, n: int, c: int, hw: int, group: int,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """ATen's group norm: (y, mean, rstd), mean and rstd shaped (n, group)."""
    return torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, group, eps)


def native_group_norm_backward(gy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, n: int,
                               c: int, hw: int, group: int,
                               output_mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """ATen's group-norm backward: (gx, dweight, dbias) from the output gradient and the forward's mean and rstd."""
    return torch.ops.aten.native_group_norm_backward(gy, x, mean, rstd, weight, n, c, hw, group, output_mask)


def dispatch_mode_base() -> type:
    """torch's TorchDispatchMode: a context manager whose `__torch_dispatch__(func, types, args, kwargs)` runs
    every ATen op called inside it, the autograd engine's backward ops included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def slow_conv2d_forward(x: Tensor, weight: Tensor, kernel_size, bias: Tensor | None, stride, padding) -> Tensor:
    """ATen's im2col + GEMM convolution (the "thnn" kernel), differentiable to every order like F.conv2d."""
    return torch.ops.aten._slow_conv2d_forward(x, weight, kernel_size, bias, stride, padding)


__all__ = ["INTERNALS", "Internal", "LOOPBACK", "RAY_CHECKED", "RAY_COLOR_PREFIX", "RAY_TRAIN_STORAGE_LOGGERS",
           "RAY_WORKER_DIED", "RAY_WORKER_EXIT", "RAY_WORKER_PID", "TORCH_CHECKED", "dashboard_dependency_error",
           "dispatch_mode_base",
           "loopback_init_kwargs", "loopback_only", "native_group_norm", "native_group_norm_backward",
           "prepare_cluster_config", "ray_node_classes", "slow_conv2d_forward", "under_func_transform",
           "validate_cluster_config"]
