"""The pre-launch check: `distill`, `boost` and every Tune trial plan the run against the memory its placement gives
a worker before anything starts; `fit` says what happens when it does not fit.

- "check" (the default): stop with one line that names the cheapest setting that fits and its cost in time;
- "auto": apply that setting and say what changed;
- "off": skip the check.
"""

from __future__ import annotations

from raydistill.config import ConfigError, DistillConfig
from raydistill.plan.devices import HEADROOM, Device, format_bytes
from raydistill.plan.estimate import Plan, plan
from raydistill.plan.fit import suggest
from raydistill.plan.shapes import PlanData

FIT_MODES = ("check", "auto", "off")


def _needs(p: Plan) -> str:
    worst = p.worker if p.worker_fits is False else p.largest
    top = max(worst.terms.items(), key=lambda kv: kv[1])
    return (f"one {worst.role} needs about {format_bytes(worst.peak)} (most of it {top[0]}: {format_bytes(top[1])}) "
            f"but {p.device.describe()} leaves it {format_bytes(p.budget)} with {HEADROOM:.0%} headroom")


def prelaunch(cfg: DistillConfig, data: PlanData, device: Device | None, fit: str = "check"
              ) -> tuple[dict, str | None]:
    """(the changes to make, a line to log when --fit auto makes some). ConfigError (one line) when the config
    cannot fit `device` and `fit` is "check", or when nothing fits. A device of unknown memory is not checked."""
    if fit not in FIT_MODES:
        raise ConfigError(f"--fit: unknown value {fit!r}; choose one of {', '.join(FIT_MODES)}")
    if fit == "off" or device is None or device.memory is None:
        return {}, None
    current = plan(cfg, data, device)
    if current.fits is not False:
        return {}, None
    if current.worker_fits:
        raise ConfigError(f"memory: {_needs(current)}; lower eval.batch_size or data.val_size, or give it more "
                          "memory (raydistill plan shows the terms)")
    options = suggest(current)
    if not options:
        raise ConfigError(f"memory: {_needs(current)}, and no setting of {cfg.method}'s memory levers fits; lower "
                          "ipc, the window or the real batch, or use a larger GPU (raydistill plan shows the terms)")
    best = options[0]
    if fit == "auto":
        return best.changes, (f"--fit auto: {best.sets} (worker peak {format_bytes(best.plan.worker.peak)} of "
                         f"{format_bytes(current.budget)}; about {best.time_factor:.1f}x the step time)")
    raise ConfigError(f"memory: {_needs(current)}; {best.sets} fits (about {best.time_factor:.1f}x the step "
                      "time), or pass --fit auto to apply it")
