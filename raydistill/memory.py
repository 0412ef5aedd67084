"""Counting the bytes a computation's tensors hold, op by op: what the memory planner measures a rehearsal with.

`LiveBytes` is a dispatch mode: every ATen op run inside it (forward ops, and the backward ops the autograd engine
runs for them) reports its results, and each new storage is counted from the moment it is made until the last
tensor that views it is freed. `peak` is then the most bytes alive at once: what a caching allocator's
`max_memory_allocated` reports, without its rounding. On the meta device nothing is computed or allocated, so a
gradient task at ImageNet scale can be rehearsed on a laptop in well under a second: the planner does exactly that
(raydistill.plan).
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

from raydistill.compat import dispatch_mode_base


class LiveBytes(dispatch_mode_base()):
    """Inside `with LiveBytes() as m:`, `m.live` is the bytes held by the storages made so far and still alive (plus
    those passed to `hold`), and `m.peak` the most that were alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()

    def hold(self, *tensors: Tensor) -> None:
        """Count tensors made outside the mode (the inputs) until they are freed."""
        for t in tensors:
            self._count(t)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _count(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._counted:  # a view of (or an in-place result in) a storage already counted
            return
        size = storage.nbytes()
        self._counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        # torch keeps a storage's Python object alive as long as the storage itself, so this runs when it is freed
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._count_all(out)
        return out

    def _count_all(self, out: Any) -> None:
        if isinstance(out, Tensor):
            self._count(out)
        elif isinstance(out, (tuple, list)):
            for item in out:
                self._count_all(item)
