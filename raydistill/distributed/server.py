"""The parameter server: a Ray actor that owns the synthetic set and applies meta-gradients to it.

It holds the MetaOptimizer (images, labels, Adam moments, grad-norm EMA), the step counter, the log of applied steps
and the best validated snapshot; it publishes one object-store snapshot per version and checkpoints every N steps.
Ray restarts it after a crash by calling __init__ again, which resumes from the newest good checkpoint. No maths here
beyond averaging: the update itself is MetaOptimizer's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import ray
import torch

from raydistill.io.checkpoint import CheckpointWarning, arrays_to_state, latest_checkpoint, save_checkpoint, state_to_arrays
from raydistill.config.core import config_from_dict
from raydistill.synset.meta_update import MetaOptimizer

CHECKPOINTS = "checkpoints"


def finite(result: dict) -> bool:
    return bool(np.isfinite(result["images"]).all()) and (
        result["labels"] is None or bool(np.isfinite(result["labels"]).all())
    )


def stats(result: dict) -> dict:
    """What the driver logs of a worker's result (everything but the gradient arrays)."""
    return {k: v for k, v in result.items() if k not in ("images", "labels")}


def average(arrays: list[np.ndarray]) -> torch.Tensor:
    """Mean over workers, summed in slot order so a given set of gradients always gives the same bits."""
    total = np.array(arrays[0])  # a writable copy: object-store arrays are read-only
    for a in arrays[1:]:
        total += a
    if len(arrays) > 1:
        total /= len(arrays)
    return torch.from_numpy(total)


class ParameterServer:
    def __init__(self, cfg_dict: dict, run_dir: str, images: np.ndarray, hard_labels: np.ndarray,
                 soft_labels: np.ndarray | None, lr_scale: np.ndarray | None = None):
        self.cfg = config_from_dict(cfg_dict, check_paths=False)
        self.checkpoints = Path(run_dir) / CHECKPOINTS
        self.hard_labels = np.asarray(hard_labels)
        self.meta = MetaOptimizer(torch.tensor(images), None if soft_labels is None else torch.tensor(soft_labels),
                                  self.cfg.meta, None if lr_scale is None else torch.tensor(lr_scale))
        self.step = 0  # meta-steps done
        self.version = 0  # snapshot version: one per applied update
        self.applied_steps: list[int] = []  # every applied step, in order: a step is never applied twice
        self.dropped = {"nonfinite": 0, "stale": 0}
        self.best: dict | None = None  # {"step", "val_acc", "images", "soft_labels"}
        self.restored_step: int | None = None
        with warnings.catch_warnings(record=True) as caught:  # surfaced to the driver through status()
            warnings.simplefilter("always", CheckpointWarning)
            found = latest_checkpoint(self.checkpoints)
        self.notes = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
        if found is not None:
            self._restore(*found[1:])
        self._publish()

    # ------------------------------------------------------------------------------------------ snapshots

    def _publish(self) -> None:
        self._snapshot = ray.put(self._arrays())

    def _arrays(self) -> dict:
        soft = self.meta.soft_labels
        return {"images": self.meta.images.numpy(), "soft_labels": None if soft is None else soft.numpy(),
                "hard_labels": self.hard_labels, "version": self.version, "step": self.step}

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
            labels = None if good[0]["labels"] is None else average([r["labels"] for r in good])
            report = self.meta.step(average([r["images"] for r in good]), labels)
            applied, grad_norm = report.applied, report.grad_norm
        return {**self._advance(step, applied, grad_norm, used=len(good)), "workers": [stats(r) for r in results]}

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
        report = self.meta.step(torch.from_numpy(np.array(result["images"])),
                                None if result["labels"] is None else torch.from_numpy(np.array(result["labels"])))
        return {**self._advance(self.step, report.applied, report.grad_norm, used=1), "staleness": staleness,
                "workers": [stats(result)]}

    def _advance(self, step: int, applied: bool, grad_norm: float | None, used: int) -> dict:
        self.step += 1
        if applied:
            self.version += 1
            self.applied_steps.append(step)
        self._publish()
        if self.step % self.cfg.ray.checkpoint_every == 0 or self.step == self.cfg.steps:
            self.checkpoint()
        return {"accepted": True, "step": self.step, "applied": applied, "grad_norm": grad_norm, "used": used,
                "dropped": dict(self.dropped), "version": self.version}

    # ------------------------------------------------------------------------------------------ best snapshot

    def offer_best(self, step: int, val_acc: float, snapshot: dict) -> bool:
        """Keep `snapshot` as the run's result if it validates better than every earlier one."""
        if self.best is not None and val_acc <= self.best["val_acc"]:
            return False
        self.best = {"step": step, "val_acc": val_acc, "images": np.array(snapshot["images"]),
                     "soft_labels": None if snapshot["soft_labels"] is None else np.array(snapshot["soft_labels"])}
        return True

    def result(self) -> dict:
        """The best validated snapshot, or the current one when nothing was validated."""
        if self.best is None:
            return {**self._arrays(), "selected_step": self.step, "val_acc": None}
        return {**self._arrays(), "images": self.best["images"], "soft_labels": self.best["soft_labels"],
                "selected_step": self.best["step"], "val_acc": self.best["val_acc"]}

    def status(self) -> dict:
        return {"step": self.step, "version": self.version, "applied_steps": list(self.applied_steps),
                "dropped": dict(self.dropped), "skipped": self.meta.skipped, "restored_step": self.restored_step,
                "best_val_acc": None if self.best is None else self.best["val_acc"], "notes": list(self.notes)}

    # ------------------------------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> str:
        state = {f"meta.{k}": v for k, v in self.meta.state_dict().items()}
        state.update({"step": self.step, "version": self.version, "applied_steps": self.applied_steps,
                      **{f"dropped.{k}": v for k, v in self.dropped.items()}})
        if self.best is not None:
            state.update({"best.step": self.best["step"], "best.val_acc": self.best["val_acc"],
                          "best.images": torch.from_numpy(self.best["images"])})
            if self.best["soft_labels"] is not None:
                state["best.soft_labels"] = torch.from_numpy(self.best["soft_labels"])
        arrays, meta = state_to_arrays(state)
        return str(save_checkpoint(self.checkpoints, self.step, arrays, meta))

    def _restore(self, arrays: dict, meta: dict) -> None:
        state = arrays_to_state(arrays, meta)
        self.meta.load_state_dict({k[len("meta."):]: v for k, v in state.items() if k.startswith("meta.")})
        self.step, self.version = int(state["step"]), int(state["version"])
        self.applied_steps = [int(s) for s in state["applied_steps"]]
        self.dropped = {k: int(state[f"dropped.{k}"]) for k in self.dropped}
        if "best.step" in state:
            soft = state.get("best.soft_labels")
            self.best = {"step": int(state["best.step"]), "val_acc": float(state["best.val_acc"]),
                         "images": state["best.images"].numpy(), "soft_labels": None if soft is None else soft.numpy()}
        self.restored_step = self.step
