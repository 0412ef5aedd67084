"""Where the driver's actors live: Ray actors, or plain objects in this process behind the same calls.

The driver (raydistill.engine.driver) is one loop for both: it calls `handle.method.remote(...)`, and
`backend.get` / `backend.wait` / `backend.put` on what comes back. In this process a call runs at once and its
result is copied, as a Ray call's would be, so no caller ever aliases the server's live tensors.
"""

from __future__ import annotations

import copy
from typing import Any

import ray
from ray.exceptions import RayError


class RayBackend:
    name = "ray"
    retryable = (RayError,)  # a failed task or a lost actor: the driver retries the step

    def put(self, value: Any) -> Any:
        return ray.put(value)

    def reference(self, value: Any) -> list:
        """A value every call may carry at little cost: one ref, in a list so that Ray passes the ref itself."""
        return [ray.put(value)]

    def get(self, ref: Any) -> Any:
        return ray.get(ref)

    def wait(self, refs: list, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        return ray.wait(refs, num_returns=num_returns, timeout=timeout)

    def actor(self, cls: type, options: dict, *args: Any) -> Any:
        return ray.remote(cls).options(**options).remote(*args)

    def kill(self, actor: Any) -> None:
        ray.kill(actor, no_restart=True)

    def cancel(self, ref: Any) -> None:
        ray.cancel(ref)


class Ready:
    """The finished result of an in-process call (it stands where a Ray ObjectRef would)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args: Any) -> Ready:
        # Like Ray, resolve top-level refs among the arguments and hand back a copy of the result.
        return Ready(copy.deepcopy(self.fn(*(a.value if isinstance(a, Ready) else a for a in args))))


class LocalActor:
    """A plain object called like a Ray actor: `handle.method.remote(*args)` runs the method now."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __getattr__(self, name: str) -> _Call:
        return _Call(getattr(self.obj, name))


class LocalBackend:
    name = "local"
    retryable: tuple = ()  # in one process a failure is a bug to see, not a task to retry

    def put(self, value: Any) -> Ready:
        return Ready(copy.deepcopy(value))

    def reference(self, value: Any) -> list:
        return [Ready(value)]  # read-only by contract, like an object-store value: no copy

    def get(self, ref: Any) -> Any:
        if isinstance(ref, list):
            return [r.value for r in ref]
        return ref.value

    def wait(self, refs: list, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
        return refs[:num_returns], refs[num_returns:]

    def actor(self, cls: type, options: dict, *args: Any) -> LocalActor:
        return LocalActor(cls(*args))

    def kill(self, actor: Any) -> None:
        pass

    def cancel(self, ref: Any) -> None:
        pass


BACKENDS = {"ray": RayBackend(), "local": LocalBackend()}
