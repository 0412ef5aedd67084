"""The parameter server: an actor that owns the synthetic set and applies gradients to it.

It holds the MetaOptimizer (the learnable tensors by name, their Adam moments, the grad-norm EMA), the step counter,
the log of applied steps, the best validated snapshot and each worker slot's method state; it publishes one
snapshot per version and checkpoints every N steps. Ray restarts it after a crash by calling __init__ again, which
resumes from the newest good checkpoint. No maths here beyond averaging: the update itself is MetaOptimizer's.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import torch

from raydistill.config import DistillConfig
from raydistill.engine.backend import BACKENDS
from raydistill.methods.registry import get_method
from raydistill.storage.atomic import json_default
from raydistill.storage.checkpoint import (
    CheckpointWarning,
    arrays_to_state,
    latest_checkpoint,
    save_checkpoint,
    state_to_arrays,
)
from raydistill.storage.run_dir import CHECKPOINTS
from raydistill.storage.store import location, one_line
from raydistill.synset.meta_update import MetaOptimizer

HARD_LABELS, LR_SCALE = "hard_labels", "example_lr_scale"  # checkpoint keys of the set's fixed parts


def finite(result: dict) -> bool:
    return all(bool(np.isfinite(g).all()) for g in result["grads"].values())


def stats(result: dict) -> dict:
    """What the driver logs of a worker's result: the method's statistics as they are, plus the loss and time."""
    return {"loss": result["loss"], "stats": result["stats"], "seconds": result["seconds"], "slot": result["slot"]}


def average(arrays: list[np.ndarray]) -> torch.Tensor:
    """Mean over workers, summed in slot order so a given set of gradients always gives the same bits."""
    total = np.array(arrays[0])  # a writable copy: object-store arrays are read-only
    for a in arrays[1:]:
        total += a
    if len(arrays) > 1:
        total /= len(arrays)
    return torch.from_numpy(total)


def copy_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in arrays.items()}


class ParameterServer:
    """Constructed from the config and the run directory alone; the initial set arrives through `start`, which
    writes it as the step-0 checkpoint. So a server that Ray restarts rebuilds everything from its newest checkpoint
    and needs no constructor argument in the object store (which the driver may no longer hold: ray-project/ray#53727).
    """

    def __init__(self, cfg: DistillConfig, run_dir: str, backend: str = "ray"):
        self.cfg = cfg
        self.backend = BACKENDS[backend]
        self.checkpoints = location(run_dir) / CHECKPOINTS  # a local path or a URI: shared storage for restarts elsewhere
        self.specs = get_method(self.cfg.method).learnables(self.cfg)
        self.meta: MetaOptimizer | None = None  # built by start(), or from a checkpoint
        self.hard_labels: np.ndarray | None = None
        self.step = 0  # meta-steps done
        self.version = 0  # snapshot version: one per applied update
        self.applied_steps: list[int] = []  # every applied step, in order: a step is never applied twice
        self.dropped = {"nonfinite": 0, "stale": 0}
        self.best: dict | None = None  # {"step", "val_acc", "learnables"}
        self.slot_states: dict[int, dict[str, np.ndarray]] = {}  # each worker slot's method state after its last task
        self.restored_step: int | None = None
        self.checkpoint_failures = 0  # failed checkpoint writes in a row
        self.last_report: dict | None = None  # the report of the step that made self.step (kept in its checkpoint)
        with warnings.catch_warnings(record=True) as caught:  # surfaced to the driver through status()
            warnings.simplefilter("always", CheckpointWarning)
            self.found = latest_checkpoint(self.checkpoints)
        self.notes = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
        if self.found is not None and HARD_LABELS in self.found[1]:  # checkpoints keep the set's fixed parts too
            state = arrays_to_state(*self.found[1:])
            self._build({k: state[f"meta.{k}"] for k in self.specs}, state[HARD_LABELS].numpy(),
                        state[LR_SCALE].numpy() if LR_SCALE in state else None)
            self._restore(state)

    def start(self, learnables: dict[str, np.ndarray], hard_labels: np.ndarray,
              lr_scale: np.ndarray | None = None) -> str | None:
        """The run's initial set, from the driver; ignored when the server resumed from a checkpoint. The step-0
        checkpoint is written now, so a restart finds it; a failed write is reported like any other (see flush)."""
        if self.meta is not None:
            return None
        self._build({k: torch.tensor(v) for k, v in learnables.items()}, np.asarray(hard_labels),
                    None if lr_scale is None else np.asarray(lr_scale))
        if self.found is not None:  # a checkpoint written before checkpoints kept the hard labels
            self._restore(arrays_to_state(*self.found[1:]))
        return self._checkpoint_if(True)

    def _build(self, learnables: dict[str, torch.Tensor], hard_labels: np.ndarray, lr_scale: np.ndarray | None) -> None:
        self.hard_labels = hard_labels
        self.meta = MetaOptimizer(learnables, self.specs, self.cfg.meta,
                                  None if lr_scale is None else torch.tensor(lr_scale))
        self._publish()

    # ------------------------------------------------------------------------------------------ snapshots

    def _publish(self) -> None:
        self._snapshot = self.backend.put(self._arrays())

    def _arrays(self) -> dict:
        return {"learnables": {k: t.numpy() for k, t in self.meta.tensors.items()}, "hard_labels": self.hard_labels,
                "version": self.version, "step": self.step, "slot_states": self.slot_states}

    def snapshot(self) -> dict:
        """The current snapshot's ref (wrapped in a list so Ray passes the ref, not the arrays) and its version."""
        return {"ref": [self._snapshot], "version": self.version, "step": self.step}

    def current(self) -> dict:
        """The synthetic set itself (copied to the caller)."""
        return self._arrays()

    # ------------------------------------------------------------------------------------------ updates

    def apply_sync(self, step: int, *results: dict) -> dict:
        """Average the K gradients of meta-step `step` and apply them; a repeated or outdated call changes nothing."""
        if step != self.step:
            return {"accepted": False, "step": self.step}
        good = [r for r in results if finite(r)]
        self.dropped["nonfinite"] += len(results) - len(good)
        applied, grad_norm = False, None
        if good:
            report = self.meta.step({name: average([r["grads"][name] for r in good]) for name in good[0]["grads"]})
            applied, grad_norm = report.applied, report.grad_norm
        for r in results:
            self._keep_slot_state(r)
        return self._advance(step, applied, grad_norm, used=len(good), workers=[stats(r) for r in results])

    def apply_async(self, result: dict) -> dict:
        """Apply one gradient, unless it was computed on a snapshot too many versions old or is not finite."""
        if self.step >= self.cfg.steps:
            return {"accepted": False, "step": self.step, "reason": "done"}
        staleness = self.version - result["version"]
        if staleness > self.cfg.ray.max_staleness:
            self.dropped["stale"] += 1
            return {"accepted": False, "step": self.step, "reason": "stale"}
        if not finite(result):
            self.dropped["nonfinite"] += 1
            return {"accepted": False, "step": self.step, "reason": "nonfinite"}
        report = self.meta.step({k: torch.from_numpy(np.array(g)) for k, g in result["grads"].items()})
        self._keep_slot_state(result)
        return self._advance(self.step, report.applied, report.grad_norm, used=1, staleness=staleness,
                             workers=[stats(result)])

    def _keep_slot_state(self, result: dict) -> None:
        if result.get("slot_state") is not None:
            self.slot_states[result["slot"]] = copy_arrays(result["slot_state"])

    def _advance(self, step: int, applied: bool, grad_norm: float | None, used: int, **report) -> dict:
        """Count the step, publish the new snapshot, checkpoint when due; the step's report (which the checkpoint
        keeps, so a line the driver never got can still be written: raydistill.engine.metrics_log)."""
        self.step += 1
        if applied:
            self.version += 1
            self.applied_steps.append(step)
        self._publish()
        self.last_report = {"accepted": True, "step": self.step, "applied": applied, "grad_norm": grad_norm,
                            "used": used, "dropped": dict(self.dropped), "version": self.version, **report}
        due = self.step % self.cfg.ray.checkpoint_every == 0 or self.step == self.cfg.steps
        error = self._checkpoint_if(due or self.checkpoint_failures > 0)
        return {**self.last_report, "checkpoint_error": error, "checkpoint_failures": self.checkpoint_failures}

    def _checkpoint_if(self, needed: bool) -> str | None:
        """Write a checkpoint when one is due or an earlier one failed; a failed write is reported, never raised.

        The step is applied either way, so the step and its report stay one unit: the driver records it, and it is
        the driver that retries (with backoff, on the next steps) and gives up after ray.write_retries failures.
        """
        if not needed:
            return None
        try:
            self.checkpoint()
        except OSError as exc:
            self.checkpoint_failures += 1
            return f"{exc.strerror or one_line(exc)} ({exc.filename or self.checkpoints})"
        self.checkpoint_failures = 0
        return None

    def flush(self) -> str | None:
        """A last checkpoint when the newest one failed (the end of a run); the error, or None."""
        return self._checkpoint_if(self.checkpoint_failures > 0)

    # ------------------------------------------------------------------------------------------ best snapshot

    def offer_best(self, step: int, val_acc: float, snapshot: dict) -> bool:
        """Keep `snapshot` as the run's result if it validates better than every earlier one."""
        if self.best is not None and val_acc <= self.best["val_acc"]:
            return False
        self.best = {"step": step, "val_acc": val_acc, "learnables": copy_arrays(snapshot["learnables"])}
        return True

    def result(self) -> dict:
        """The best validated snapshot, or the current one when nothing was validated."""
        if self.best is None:
            return {**self._arrays(), "selected_step": self.step, "val_acc": None}
        return {**self._arrays(), "learnables": self.best["learnables"], "selected_step": self.best["step"],
                "val_acc": self.best["val_acc"]}

    def status(self) -> dict:
        return {"step": self.step, "version": self.version, "applied_steps": list(self.applied_steps),
                "dropped": dict(self.dropped), "skipped": self.meta.skipped, "restored_step": self.restored_step,
                "best_val_acc": None if self.best is None else self.best["val_acc"], "notes": list(self.notes),
                "checkpoint_failures": self.checkpoint_failures, "last_report": self.last_report}

    # ------------------------------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> str:
        state = {f"meta.{k}": v for k, v in self.meta.state_dict().items()}
        state[HARD_LABELS] = torch.from_numpy(np.asarray(self.hard_labels))
        if self.meta.example_lr_scale is not None:
            state[LR_SCALE] = self.meta.example_lr_scale
        state.update({"step": self.step, "version": self.version, "applied_steps": self.applied_steps,
                      "last_report": json.dumps(self.last_report, default=json_default),  # as metrics.jsonl does
                      **{f"dropped.{k}": v for k, v in self.dropped.items()}})
        if self.best is not None:
            state.update({"best.step": self.best["step"], "best.val_acc": self.best["val_acc"],
                          **{f"best.learnables.{k}": torch.from_numpy(v) for k, v in self.best["learnables"].items()}})
        for slot, slot_state in self.slot_states.items():
            state.update({f"slot.{slot}.{k}": torch.from_numpy(np.asarray(v)) for k, v in slot_state.items()})
        arrays, meta = state_to_arrays(state)
        return str(save_checkpoint(self.checkpoints, self.step, arrays, meta))

    def _restore(self, state: dict) -> None:
        self.meta.load_state_dict({k[len("meta."):]: v for k, v in state.items() if k.startswith("meta.")})
        self.step, self.version = int(state["step"]), int(state["version"])
        self.applied_steps = [int(s) for s in state["applied_steps"]]
        self.dropped = {k: int(state[f"dropped.{k}"]) for k in self.dropped}
        if "best.step" in state:
            prefix = "best.learnables."
            self.best = {"step": int(state["best.step"]), "val_acc": float(state["best.val_acc"]),
                         "learnables": {k[len(prefix):]: v.numpy() for k, v in state.items() if k.startswith(prefix)}}
        for key, value in state.items():
            if key.startswith("slot."):
                _, slot, name = key.split(".", 2)
                self.slot_states.setdefault(int(slot), {})[name] = value.numpy()
        self.last_report = json.loads(state["last_report"]) if "last_report" in state else None  # older checkpoints
        self.restored_step = self.step
        self._publish()
