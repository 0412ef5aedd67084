"""Making a plan fit: the settings that would, their cost in time, and applying the cheapest (`--fit auto`).

A method names its memory levers (`Method.memory_levers`): a config field, its values from weakest to strongest,
about how much slower a step gets, and whether the gradient stays the same. The search tries the levers that keep
the gradient first, cheapest first, each at the smallest value that fits, stacking a lever at its strongest before
adding the next; the levers that change the algorithm come after those. Candidates are ranked by the method's quick
estimate (`Method.approximate_peak`) and the one picked is planned again by a fresh rehearsal, so what is suggested
is what was checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raydistill.config import DistillConfig
from raydistill.config.loading import merge_overrides
from raydistill.methods.registry import get_method
from raydistill.plan.devices import format_bytes
from raydistill.plan.estimate import Plan, plan
from raydistill.setup import config_from_dict, config_to_dict

VERIFY = 3  # rehearsals per lever before giving up on it (each a stronger value than the last)


@dataclass
class Suggestion:
    changes: dict[str, Any]  # dotted field -> value
    plan: Plan
    time_factor: float  # a step's time relative to the current config's, about
    same_gradient: bool

    @property
    def sets(self) -> str:
        return " ".join(f"--set {k}={v}" for k, v in self.changes.items())

    def describe(self) -> str:
        kind = "the same gradient" if self.same_gradient else "a different algorithm"
        return (f"{self.sets}: worker peak {format_bytes(self.plan.worker.peak)}, about {self.time_factor:.1f}x the "
                f"step time ({kind})")


def with_changes(cfg: DistillConfig, changes: dict[str, Any]) -> DistillConfig:
    """cfg with dotted fields set, built and checked again."""
    raw = merge_overrides(config_to_dict(cfg), [f"{k}={v}" for k, v in changes.items()])
    return config_from_dict(raw, check_paths=False)


class _Search:
    def __init__(self, current: Plan):
        self.current, self.cfg = current, current.config
        self.method = get_method(self.cfg.method)

    def plausible(self, changes: dict[str, Any]) -> bool:
        """Whether the quick estimate says the worker could fit with `changes` (True when there is none)."""
        cur, task = self.current, self.current.worker.task
        approx = None if task is None else self.method.approximate_peak(self.cfg, task, changes)
        if approx is None:
            return True
        worker = cur.worker.peak - cur.device.peak(task.peak) + cur.device.peak(approx)
        return worker <= cur.budget

    def verified(self, changes: dict[str, Any]) -> Plan | None:
        p = plan(with_changes(self.cfg, changes), self.current.data, self.current.device)
        return p if p.worker_fits else None

    def one_pass(self, same_gradient: bool, fixed: dict[str, Any]) -> tuple[Suggestion | None, dict[str, Any]]:
        """The cheapest suggestion from the levers of one kind, on top of `fixed`; and the levers at their
        strongest when none fits."""
        levers = [lv for lv in self.method.memory_levers(self.cfg) if lv.same_gradient == same_gradient]
        factor = 1.0
        for lever in sorted(levers, key=lambda lv: lv.time_factor):
            factor *= lever.time_factor
            start = next((i for i, v in enumerate(lever.values) if self.plausible({**fixed, lever.field: v})), None)
            for value in lever.values[start:start + VERIFY] if start is not None else []:
                changes = {**fixed, lever.field: value}
                p = self.verified(changes)
                if p is not None:
                    changes, p = self.relaxed(changes, p, lever.field)
                    return Suggestion(changes, p, factor, same_gradient), fixed
            fixed = {**fixed, lever.field: lever.values[-1]}
        return None, fixed


    def relaxed(self, changes: dict[str, Any], fitting: Plan, last: str) -> tuple[dict[str, Any], Plan]:
        """`changes` with each lever held at its strongest before `last` set back to its weakest value that still
        fits (the quick estimate picks it, a rehearsal confirms it)."""
        levers = {lv.field: lv for lv in self.method.memory_levers(self.cfg)}
        for field in [f for f in changes if f != last and f in levers]:
            for value in levers[field].values:
                if value == changes[field]:
                    break
                trial = {**changes, field: value}
                if self.plausible(trial):
                    p = self.verified(trial)
                    if p is not None:
                        changes, fitting = trial, p
                    break
        return changes, fitting


def suggest(current: Plan) -> list[Suggestion]:
    """Settings that make `current` fit, cheapest first: the best that keeps the gradient, and the best that
    changes it (each where one exists); none when the gradient worker fits."""
    if current.worker_fits is not False:
        return []
    search = _Search(current)
    exact, strongest = search.one_pass(True, {})
    out = [exact] if exact else []
    other, _ = search.one_pass(False, {} if exact else strongest)
    if other is not None:
        other.same_gradient = False
        out.append(other)
    return out
