"""metrics.jsonl, the run's record: one line per meta-step, written by the driver from the server's reports.

After a restart (of the server, or of the driver with `--resume`) the steps after the server's checkpoint are redone,
so their old lines go (`keep_metrics_up_to`). The checkpoint's own step may lack its line: the server wrote the
checkpoint and died before its report reached the driver, or the driver died before writing it. The server keeps
that report in the checkpoint, and `add_missing_step` writes the line from it (marked `recovered`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raydistill.storage.atomic import append_jsonl, atomic_write_text


def step_record(report: dict, **driver: object) -> dict:
    """The metrics line of one applied meta-step from the server's report, plus what only the driver knows (the
    step's wall seconds; the async slot)."""
    workers = report["workers"]
    record = {"step": report["step"], "meta_loss": float(np.mean([w["loss"] for w in workers])),
              "stats": [w["stats"] for w in workers], "grad_norm": report["grad_norm"], "applied": report["applied"]}
    if "staleness" in report:  # async: one gradient per step
        record.update(staleness=report["staleness"], dropped_stale=report["dropped"]["stale"])
    else:
        record.update(used=report["used"], worker_seconds=[round(w["seconds"], 4) for w in workers])
    return {**record, "dropped_nonfinite": report["dropped"]["nonfinite"], **driver}


def _lines(path: Path) -> list[tuple[str, dict]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
    return out


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (they are about to be redone after a restart)."""
    if not path.exists():
        return
    kept = [line for line, obj in _lines(path) if isinstance(obj, dict) and isinstance(obj.get("step"), int)
            and obj["step"] <= step]
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def add_missing_step(path: Path, record: dict) -> bool:
    """Append `record` (a meta-step's line) unless the file already has a line of that step; True when added."""
    if path.exists() and any(obj.get("step") == record["step"] and "val_acc" not in obj
                             for _, obj in _lines(path) if isinstance(obj, dict)):
        return False
    append_jsonl(path, record)
    return True
