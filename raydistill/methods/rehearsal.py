"""What a method's gradient task holds in memory, found by rehearsing it on the meta device.

A rehearsal runs a method's own code (its network, inner steps, losses and backward passes) on tensors of the
meta device: shapes and dtypes are real, nothing is computed or allocated. `raydistill.memory.LiveBytes` counts
the bytes each op's results would hold, so the peak is what a GPU allocator's `max_memory_allocated` would report
for the task (without its rounding). Rehearsals are short: a method rehearses one or two inner steps and
extrapolates linearly in the quantities its memory is linear in (window steps, segments), phase by phase, so the
largest of the phases is found even where it changes with the settings.

The memory planner (raydistill.plan) adds what lives outside one task (the held real data, the runtime) and
compares the sum with what a worker's placement gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from raydistill.memory import LiveBytes

META = torch.device("meta")


@dataclass(frozen=True)
class DataShape:
    """What a rehearsal needs to know of the data set."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int


@dataclass
class TaskMemory:
    """One gradient task's peak bytes, and what makes it up (`terms`: name -> bytes, summing to `peak`)."""

    peak: int
    terms: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the rehearsal approximates, for the plan's reader
    parts: dict[str, float] = field(default_factory=dict)  # the method's own numbers for approximate_peak


@dataclass
class Phase:
    """The live bytes when a phase starts and ends and the most alive during it, in one rehearsal."""

    start: int = 0
    end: int = 0
    peak: int = 0
    flops: int = 0  # floating-point operations during the phase, when the recorder counts them


class PhaseRecorder:
    """Phases of one rehearsal, recorded on a LiveBytes by name: `with rec.phase("window"): ...`."""

    def __init__(self, meter: LiveBytes, counter: FlopCounterMode | None = None):
        self.meter, self.counter = meter, counter
        self.phases: dict[str, Phase] = {}

    def flops(self) -> int:
        return 0 if self.counter is None else self.counter.get_total_flops()

    def phase(self, name: str) -> _PhaseScope:
        return _PhaseScope(self, name)


class _PhaseScope:
    def __init__(self, rec: PhaseRecorder, name: str):
        self.rec, self.name = rec, name

    def __enter__(self) -> None:
        m = self.rec.meter
        m.reset_peak()
        self.rec.phases[self.name] = Phase(start=m.live, flops=-self.rec.flops())

    def __exit__(self, *exc) -> None:
        m, p = self.rec.meter, self.rec.phases[self.name]
        p.end, p.peak = m.live, m.peak
        p.flops += self.rec.flops()


def meta_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=META, requires_grad=requires_grad)


def linear(at_1: int, at_2: int, n: int) -> int:
    """The value at n of the line through (1, at_1) and (2, at_2)."""
    return at_1 + (n - 1) * (at_2 - at_1)


def training_step_bytes(model: torch.nn.Module, batch: int, shape: DataShape) -> int:
    """Peak bytes of one ordinary training step (forward, backward, Adam) of `model` on a batch of `batch` images,
    the network, its optimizer state and the batch included: what an evaluation or validation network holds while
    it trains on the synthetic set."""
    with LiveBytes() as meter:
        x = meta_empty((batch, *shape.image_shape))
        y = meta_empty((batch,), torch.long)
        model = model.to(META).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        peak = meter.peak
        del loss, opt, model, x, y
    return peak


def inference_bytes(model: torch.nn.Module, batch: int, shape: DataShape) -> int:
    """Peak bytes of one no-grad forward of `batch` images (an accuracy pass), the network included."""
    with LiveBytes() as meter, torch.no_grad():
        model = model.to(META).eval()
        x = meta_empty((batch, *shape.image_shape))
        model(x)
        peak = meter.peak
        del model, x
    return peak
