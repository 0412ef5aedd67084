"""One RaT-BPTT meta-gradient task, rehearsed on the meta device for the memory planner (raydistill.plan).

It runs meta_gradient.py's own `Unroll`: the same network, inner optimizer, minibatches, augmentations, meta-loss
and backward passes, on meta tensors. A task's memory has four phases:
- the prefix: graph-free inner steps, one at a time (its peak is one step's);
- the window: each differentiable step keeps its graph (activations, and the graph of its own backward pass,
  which the meta-gradient differentiates again) until the meta-loss is back-propagated: linear in W;
- the meta-loss: the real batch's forward (all of it at once, or one of `real_batch_chunks` chunks);
- the backward pass through the meta-loss and the window.
With `window_segments` = k, the window runs forward without a graph keeping k inner states, and each segment of
L = ceil(W / k) steps rebuilds its graph during the backward pass: memory linear in k and in L.

The plain path is rehearsed at W = 1 and 2 and each phase extrapolated to W; the checkpointed path at
(k, L) = (1, 1), (1, 2), (2, 1) and extrapolated to (k, L). The peak is the largest phase.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from raydistill.config.schema import DistillConfig
from raydistill.memory import LiveBytes
from raydistill.methods.base import Lever
from raydistill.methods.ratbptt.checkpointed import checkpointed_window_gradient, segment_lengths
from raydistill.methods.ratbptt.config import RatBpttConfig
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, Unroll
from raydistill.methods.rehearsal import DataShape, Phase, PhaseRecorder, TaskMemory, linear, meta_empty
from raydistill.models.registry import build_network


def rehearsed_section(r: RatBpttConfig) -> RatBpttConfig:
    """The section a rehearsal runs: more than two real-batch chunks are rehearsed as two of the same size (one
    chunk's graph is alive at a time, so the peak is the same; `chunk_input_bytes` adds the rest of the batch's
    input), and compile_prefix is off (the prefix holds no graph either way, and it needs a compiler)."""
    r = replace(r, compile_prefix=False)
    if r.real_batch_chunks > 2:
        r = replace(r, real_batch=2 * math.ceil(r.real_batch / r.real_batch_chunks), real_batch_chunks=2)
    return r


def chunk_input_bytes(r: RatBpttConfig, shape: DataShape) -> int:
    """The augmented real images a rehearsal of two chunks leaves out: the whole batch is alive while its chunks
    run."""
    c, h, w = shape.image_shape
    return (r.real_batch - rehearsed_section(r).real_batch) * c * h * w * 4


def _unroll(cfg: DistillConfig, shape: DataShape) -> tuple[Unroll, SynSet, RealBatch]:
    """The task's Unroll (built on the CPU, its network then moved to the meta device by the rehearsal) and meta
    tensors standing for the synthetic set and the worker's real images."""
    r = rehearsed_section(cfg.method_config)
    nc, (c, h, w) = shape.num_classes, shape.image_shape
    hard = torch.arange(nc).repeat_interleave(cfg.ipc)

    def factory() -> torch.nn.Module:
        return build_network(cfg.model.name, cfg.model, shape.image_shape, nc)

    unroll = Unroll(SynSet(torch.zeros(1, c, 1, 1), hard), factory, r, cfg.augment, 0)
    images = meta_empty((len(hard), c, h, w), requires_grad=True)
    soft = meta_empty((len(hard), nc), requires_grad=True) if cfg.labels.learn else None
    syn = SynSet(images, hard.to("meta"), soft)
    real = RealBatch(meta_empty((r.real_batch, c, h, w)), meta_empty((r.real_batch,), torch.long))
    return unroll, syn, real


def _setup(rec: PhaseRecorder, unroll: Unroll, syn: SynSet) -> tuple[list[Tensor], object]:
    rec.meter.hold(*[t for t in (syn.images, syn.hard_labels, syn.soft_labels) if t is not None])
    with rec.phase("network"):
        unroll.model.to("meta")
        params = unroll.flatten([p.detach() for p in unroll.model.parameters()])
        state = unroll.opt.init(params)
    with rec.phase("prefix"):  # one graph-free step (dropped: the window starts from the same state)
        unroll.step(params, state, syn.images.detach(), syn.targets.detach(), create_graph=False, window=False)
    return params, state


def _plain(cfg: DistillConfig, shape: DataShape, steps: int, counter: FlopCounterMode | None = None
           ) -> PhaseRecorder:
    unroll, syn, real = _unroll(cfg, shape)
    leaves = [t for t in (syn.images, syn.soft_labels) if t is not None]
    with contextlib.nullcontext() if counter is None else counter, LiveBytes() as meter:
        rec = PhaseRecorder(meter, counter)
        params, state = _setup(rec, unroll, syn)
        params = [p.requires_grad_(True) for p in params]
        with rec.phase("forward"):  # what one step's forward keeps (its activations), dropped again
            loss = unroll.inner_loss(params, syn.images, syn.targets, True)
            kept = meter.live
            del loss
        rec.phases["forward"].peak = kept
        with rec.phase("window"):
            for i in range(steps):
                params, state = unroll.step(params, state, syn.images, syn.targets, create_graph=True)
                if i == steps - 2:
                    rec.phases["window but the last step"] = Phase(end=meter.live)
        with rec.phase("meta-loss"):
            if cfg.method_config.real_batch_chunks > 1:  # meta_gradient's chunked path
                _, d_final = unroll.meta_loss_and_gradient([p.detach().requires_grad_(True) for p in params], real)
                torch.autograd.grad(params, leaves, grad_outputs=d_final)
            else:
                loss = unroll.meta_loss(params, real)
                rec.phases["real batch"] = Phase(start=rec.phases["meta-loss"].start, end=meter.live)  # forward
                torch.autograd.grad(loss, leaves)
    return rec


def _checkpointed(cfg: DistillConfig, shape: DataShape, lengths: list[int]) -> PhaseRecorder:
    unroll, syn, real = _unroll(cfg, shape)
    leaves = [t for t in (syn.images, syn.soft_labels) if t is not None]
    with LiveBytes() as meter:
        rec = PhaseRecorder(meter)
        params, state = _setup(rec, unroll, syn)

        def step(p, s, create_graph):
            return unroll.step(p, s, syn.images, syn.targets, create_graph)

        def meta_loss(final):
            rec.phases["window"].end, rec.phases["window"].peak = meter.live, meter.peak  # the graph-free forward
            with rec.phase("meta-loss"):
                out = unroll.meta_loss_and_gradient(final, real)
            meter.reset_peak()
            rec.phases["segments"] = Phase(start=meter.live)
            return out

        with rec.phase("window"):
            checkpointed_window_gradient(step, meta_loss, params, state, lengths, leaves, unroll.rng)
        seg = rec.phases["segments"]
        seg.peak, seg.end = meter.peak, meter.live
    return rec


def mean_start_and_window(r: RatBpttConfig) -> tuple[float, float]:
    """The average window start (the prefix's steps) and window length a task of this section draws."""
    T, W = r.unroll, r.window
    return {"random": ((T - W) / 2, W), "end": (T - W, W), "fixed": (r.fixed_start, W), "full": (0, T),
            "random_length": (0, (W + T) / 2)}[r.window_mode]


def step_flops(cfg: DistillConfig, shape: DataShape) -> float:
    """Floating-point operations of one average task (prefix, window, meta-loss, backward), counted in two plain
    rehearsals (one and two window steps) and extrapolated; a window recomputed in segments adds one graph-free
    pass over the window."""
    r: RatBpttConfig = cfg.method_config
    one, two = (_plain(cfg, shape, n, FlopCounterMode(display=False)) for n in (1, 2))
    total = [sum(p.flops for k, p in rec.phases.items() if k in ("window", "meta-loss")) for rec in (one, two)]
    prefix = one.phases["prefix"].flops
    start, window = mean_start_and_window(r)
    flops = total[0] + (window - 1) * (total[1] - total[0]) + start * prefix
    if r.window_segments > 1:
        flops += window * prefix
    return flops * r.samples_per_task


def rehearse(cfg: DistillConfig, shape: DataShape) -> TaskMemory:
    """The peak bytes of one RaT-BPTT gradient task for `cfg` on data of `shape`, and its terms."""
    r: RatBpttConfig = cfg.method_config
    window = r.unroll if r.window_mode in ("full", "random_length") else r.window  # the longest window it draws
    one = _plain(cfg, shape, 2)
    forward = one.phases["forward"].peak - one.phases["forward"].start
    base = one.phases["network"].end
    terms = {"synthetic set": one.phases["network"].start, "network and inner optimizer": base - one.phases[
        "network"].start}
    notes = []
    if r.window_segments <= 1:
        # one rehearsal of two window steps; each further step holds one more step's graph in every later phase
        per_step = one.phases["window"].end - one.phases["window but the last step"].end
        per_state = base - one.phases["network"].start  # the network and its inner optimizer state, about
        peaks = {k: one.phases[k].peak + (window - 2) * per_step for k in ("window", "meta-loss")}
        peaks["prefix"] = one.phases["prefix"].peak
        held_window = window * per_step
        held = one.phases.get("real batch", one.phases["meta-loss"])  # chunked: the peak of the chunks' phase
        real = (held.end if "real batch" in one.phases else held.peak) - held.start
    else:
        k = min(r.window_segments, window)
        L = max(segment_lengths(window, k))
        p11, p12, p21 = (_checkpointed(cfg, shape, lengths) for lengths in ([1], [2], [1, 1]))
        per_step = p12.phases["segments"].peak - p11.phases["segments"].peak
        per_state = p21.phases["meta-loss"].peak - p11.phases["meta-loss"].peak
        peaks = {"prefix": p11.phases["prefix"].peak,
                 "window": linear(p11.phases["window"].peak, p21.phases["window"].peak, k),
                 "meta-loss": linear(p11.phases["meta-loss"].peak, p21.phases["meta-loss"].peak, k),
                 "segments": p11.phases["segments"].peak + (L - 1) * per_step + (k - 1) * per_state}
        held_window = L * per_step
        terms[f"segment starts ({k} inner states)"] = k * per_state
        real = p11.phases["meta-loss"].peak - p11.phases["meta-loss"].start
        notes.append(f"window_segments {k}: the graph of one segment ({L} of {window} steps) at a time")
    peaks["meta-loss"] += chunk_input_bytes(r, shape)
    real += chunk_input_bytes(r, shape)
    peak = max(peaks.values())
    steps = L if r.window_segments > 1 else window
    fwd = min(forward * steps, held_window)
    of = f"{steps} step{'s' if steps != 1 else ''}"
    terms[f"window activations ({of})"] = fwd
    terms[f"window double backward ({of})"] = held_window - fwd
    chunk = math.ceil(r.real_batch / r.real_batch_chunks)
    terms[f"real batch ({chunk} images at once)"] = real
    terms["backward and transients"] = max(0, peak - sum(terms.values()))
    parts = {"base": base, "per_step": per_step, "state": per_state, "real_per_image": real / chunk,
             "transient": terms["backward and transients"]}
    if r.precision == "bf16":
        notes.append("precision bf16 is planned as float32 (an upper bound)")
    if r.samples_per_task > 1:
        notes.append(f"samples_per_task {r.samples_per_task}: the graph terms are counted once per sample")
        for key in list(terms):
            if key not in ("synthetic set",):
                terms[key] *= r.samples_per_task
        peak = sum(terms.values())
    return TaskMemory(peak=peak, terms=terms, notes=notes, parts=parts)


def approximate_peak(cfg: DistillConfig, task: TaskMemory, changes: dict) -> int:
    """A quick estimate of the task's peak with RaT-BPTT's levers changed (`changes`: dotted field -> value), from
    the parts of a rehearsal of `cfg`: what the planner's search ranks candidates by before rehearsing the one it
    picks."""
    r: RatBpttConfig = cfg.method_config
    p = task.parts
    window = r.unroll if r.window_mode in ("full", "random_length") else r.window
    chunks = changes.get("ratbptt.real_batch_chunks", r.real_batch_chunks)
    k = min(changes.get("ratbptt.window_segments", r.window_segments), window)
    per_class = r.batch_per_class or cfg.ipc
    step = p["per_step"] * changes.get("ratbptt.batch_per_class", per_class) / per_class
    real = p["real_per_image"] * math.ceil(r.real_batch / chunks)
    if k <= 1:
        held = window * step + real
    else:
        held = k * p["state"] + max(max(segment_lengths(window, k)) * step, real)
    return int((p["base"] + held + p["transient"]) * r.samples_per_task)


# A checkpointed window recomputes its forward once during the backward pass: 23.6 s against 19.5 s a CIFAR-shaped
# meta-step at W 60 on the 2-core CPU (benchmarks/results/step_window.json).
SEGMENT_TIME = 1.2
MIN_CHUNK = 8  # real images per chunk below which more chunks save too little to suggest
SEGMENT_COUNTS = (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200)


def memory_levers(cfg: DistillConfig) -> list[Lever]:
    """RaT-BPTT's memory levers: real-batch chunks (the same gradient, about the same time), window segments (the
    same gradient, about 1.2x the time), and smaller inner batches (a different algorithm: fewer synthetic images
    per inner step, and faster)."""
    r: RatBpttConfig = cfg.method_config
    window = r.unroll if r.window_mode in ("full", "random_length") else r.window
    chunks = [c for c in (2, 4, 8, 16, 32, 64, 128) if r.real_batch_chunks < c and r.real_batch / c >= MIN_CHUNK]
    segments = [k for k in SEGMENT_COUNTS if r.window_segments < k <= window] if r.samples_per_task == 1 else []
    per_class = r.batch_per_class or cfg.ipc
    smaller = [b for b in (per_class // 2, per_class // 4, 1) if 0 < b < per_class]
    levers = [Lever("ratbptt.real_batch_chunks", chunks, 1.0, True) if r.samples_per_task == 1 else None,
              Lever("ratbptt.window_segments", segments, SEGMENT_TIME, True),
              Lever("ratbptt.batch_per_class", sorted(set(smaller), reverse=True), 1.0, False)]
    return [lv for lv in levers if lv is not None and lv.values]
