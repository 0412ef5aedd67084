"""`raydistill plan`'s text: each process's predicted peak, its largest terms, whether it fits, and what would."""

from __future__ import annotations

from raydistill.plan.devices import CPU_GFLOPS, HEADROOM, format_bytes
from raydistill.plan.estimate import Estimate, Plan
from raydistill.plan.fit import Suggestion

TERMS_SHOWN = 5


def _verdict(p: Plan, e: Estimate) -> str:
    if e.on == "host":
        return "host memory (the driver's node)"
    if e.peak is None:
        return "not modelled"
    if p.budget is None:
        return ""
    return "fits" if e.peak <= p.budget else "DOES NOT FIT"


def _terms(e: Estimate) -> list[str]:
    shown = sorted(e.terms.items(), key=lambda kv: -kv[1])[:TERMS_SHOWN]
    return [f"      {name:44s} {format_bytes(value):>10s}" for name, value in shown if value > 0]


def _time(p: Plan) -> str:
    flops = p.worker.flops
    if not flops:
        return "  step time: not estimated (the method's operations are not counted)"
    text = f"  compute: {flops / 1e9:,.0f} GFLOP per gradient task"
    if p.device.kind == "cpu":
        seconds = flops / (CPU_GFLOPS * 1e9)
        return (f"{text}; roughly {seconds:,.0f} s per task on one thread of the calibration CPU (its median "
                f"{CPU_GFLOPS:g} GFLOP/s; 4 to 35 across configs, benchmarks/README.md)")
    return f"{text}; no step time: the planner has no GPU calibration yet"


def render(p: Plan, suggestions: list[Suggestion], title: str) -> str:
    cfg, dev = p.config, p.device
    budget = (f"; a worker may use {format_bytes(p.budget)} ({1 - HEADROOM:.0%} of {format_bytes(dev.memory)})"
              if p.budget is not None else "")
    lines = [f"plan: {title} on {dev.describe()}{budget}",
             f"  data: {'x'.join(map(str, p.data.shape.image_shape))} images, {p.data.shape.num_classes} classes, "
             f"{p.data.train_images} training images ({p.data.source}); method {cfg.method}, IPC {cfg.ipc}, "
             f"{cfg.model.name}-{cfg.model.depth} width {cfg.model.width}, {cfg.ray.workers} worker(s)"]
    for e in p.estimates:
        peak = "?" if e.peak is None else format_bytes(e.peak)
        lines.append(f"  {e.role:18s} {peak:>10s}   {_verdict(p, e)}")
        lines.extend(_terms(e))
        lines.extend(f"      note: {n}" for n in e.notes)
    lines.append(_time(p))
    if p.fits is True:
        lines.append("fits.")
    elif p.fits is None:
        lines.append("no device memory given (--gpu or --gpu-memory): nothing to compare against."
                     if p.modelled else "not planned: the method has no memory rehearsal.")
    elif suggestions:
        lines.append("does not fit. Settings that would (checked by a fresh plan):")
        lines.extend(f"  {s.describe()}" for s in suggestions)
        lines.append("  (distill, boost: --fit auto applies the first)")
    else:
        lines.append("does not fit, and no setting of the method's memory levers makes it fit: lower ipc, the "
                     "window or the real batch, or plan for a larger GPU.")
    return "\n".join(lines)
