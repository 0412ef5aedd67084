"""The distributed driver: a parameter server, K meta-gradient workers and validation tasks on Ray.

Sync mode: every meta-step, K workers each draw their own window, init and real batch on the same snapshot; the
server averages the K gradients into one update (K = 1 is the single-machine algorithm, bit for bit). Async mode:
the server applies gradients as they arrive and drops those more than `ray.max_staleness` versions old.

Failures: workers and the server restart on their own (max_restarts=-1); a worker task is retried with the same seed,
so it recomputes the same gradient; the server resumes from its last checkpoint and the driver simply asks it which
step comes next, so no step is lost or applied twice. A killed driver continues with `--resume RUN_DIR`.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import ray
from ray.exceptions import RayError
from tqdm import tqdm

from raydistill.io import run_dir as rundir
from raydistill.io.atomic import append_jsonl, atomic_write_text
from raydistill.io.checkpoint import CheckpointWarning
from raydistill.distributed.cluster import (
    TrialPlacement,
    WorkerPlacement,
    connect,
    driver_node_strategy,
    placement_state,
    worker_resources,
)
from raydistill.config.core import DistillConfig, config_to_dict
from raydistill.distributed.local import SyntheticSet, init_synthetic, load_checked, run_evaluation
from raydistill.runtime import resolve_device
from raydistill.distributed.server import ParameterServer
from raydistill.distributed.worker import MetaGradWorker, validate_snapshot


ValidationHook = Callable[[int, float, float], None]  # (step, val_acc, best val_acc so far)


class EngineError(RuntimeError):
    """A run that cannot go on (one line: what happened and what to do); its checkpoints stay usable."""


class Run:
    """The actors of one distillation run and the driver-side bookkeeping (metrics, pending validations)."""

    def __init__(self, cfg: DistillConfig, run: Path, dataset, placement, worker_cls: type, server_cls: type,
                 initial: SyntheticSet | None = None, on_validation: ValidationHook | None = None):
        self.cfg, self.run, self.dataset = cfg, run, dataset
        self.cfg_dict = config_to_dict(cfg)
        syn = initial if initial is not None else init_synthetic(cfg, dataset)
        self.blocks = syn.blocks
        self.placement = placement
        self.on_validation = on_validation
        self.ps = ray.remote(server_cls).options(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                                 scheduling_strategy=driver_node_strategy()).remote(
            self.cfg_dict, str(run), syn.images.numpy(), syn.hard_labels.numpy(),
            None if syn.soft_labels is None else syn.soft_labels.numpy(),
            None if syn.lr_scale is None else syn.lr_scale.numpy())
        remote_worker = ray.remote(worker_cls)
        self.workers = [
            remote_worker.options(max_restarts=-1, max_task_retries=-1, **self.placement.options(i)).remote(self.cfg_dict)
            for i in range(cfg.ray.workers)
        ]
        self.validate = ray.remote(num_cpus=0, max_retries=3)(validate_snapshot)
        self.pending: dict = {}  # validation ref -> (step, snapshot ref owned by the driver)
        self.failures = 0
        self.notes_shown: set[str] = set()

    # ------------------------------------------------------------------------------------------ bookkeeping

    def start_step(self) -> int:
        status = ray.get(self.ps.status.remote())
        for note in status["notes"]:  # e.g. a damaged checkpoint the server skipped
            if note not in self.notes_shown:
                self.notes_shown.add(note)
                warnings.warn(note, CheckpointWarning, stacklevel=2)
        step = status["step"]
        keep_metrics_up_to(self.run / rundir.METRICS, step)  # steps after the checkpoint are redone
        return step

    def record(self, record: dict) -> None:
        append_jsonl(self.run / rundir.METRICS, record)

    def maybe_validate(self, step: int) -> None:
        every = self.cfg.eval.every
        if every and (step % every == 0 or step == self.cfg.steps):
            snapshot = ray.put(ray.get(self.ps.current.remote()))  # owned by the driver: survives a server restart
            self.pending[self.validate.remote(self.cfg_dict, snapshot)] = (step, snapshot)

    def collect_validations(self, wait: bool = False) -> list[tuple[int, float]]:
        done = []
        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending) if wait else 1, timeout=None if wait else 0)
            if not ready:
                break
            for ref in ready:
                step, snapshot = self.pending.pop(ref)
                acc = ray.get(ref)
                ray.get(self.ps.offer_best.remote(step, acc, snapshot))
                self.record({"step": step, "val_acc": acc})
                done.append((step, acc))
                if self.on_validation is not None:
                    self.on_validation(step, acc, ray.get(self.ps.status.remote())["best_val_acc"])
        return done

    def wait(self, ref):
        """ray.get that notices when the workers lost their resources for good (it would otherwise wait forever).

        A worker whose node died waits in Ray's restart queue without failing any task; if its placement-group
        bundle has not been placed again within ray.placement_timeout_s, the run stops with a clear error.
        """
        unplaced_since = None
        while True:
            ready, _ = ray.wait([ref], timeout=5.0)
            if ready:
                return ray.get(ref)
            if placement_state(self.placement.group) == "CREATED":
                unplaced_since = None
            elif unplaced_since is None:
                unplaced_since = time.monotonic()
            elif time.monotonic() - unplaced_since > self.cfg.ray.placement_timeout_s:
                raise EngineError(
                    f"workers lost their resources (a node left the cluster?) and could not be placed again within "
                    f"ray.placement_timeout_s={self.cfg.ray.placement_timeout_s:g} s; add capacity, then continue "
                    f"with: raydistill distill --resume {self.run}")

    def failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures > self.cfg.ray.max_consecutive_failures:
            raise EngineError(f"{self.failures} consecutive failures, the last: {str(exc).splitlines()[0]}; "
                              f"fix the cause, then continue with: raydistill distill --resume {self.run}") from exc
        time.sleep(min(0.1 * self.failures, 2.0))

    def placement_report(self) -> list[dict]:
        """Where each worker runs now (node, device): workers may have moved after a restart."""
        return ray.get([w.where.remote() for w in self.workers])

    def shutdown(self) -> None:
        for actor in [self.ps, *self.workers]:
            ray.kill(actor, no_restart=True)
        self.placement.remove()

    # ------------------------------------------------------------------------------------------ the loops

    def sync_loop(self, bar: tqdm) -> None:
        step = self.start_step()
        bar.update(step)
        while step < self.cfg.steps:
            began = time.perf_counter()
            try:
                snap = ray.get(self.ps.snapshot.remote())
                step = snap["step"]
                grads = [w.compute.remote(snap["ref"], step, slot) for slot, w in enumerate(self.workers)]
                # Gradients go from the workers straight to the server; the driver only waits for the outcome.
                report = self.wait(self.ps.apply_sync.remote(step, *grads))
                if not report["accepted"]:  # the server restarted from a checkpoint: carry on from its step
                    step = self.start_step()
                    bar.reset(total=self.cfg.steps)
                    bar.update(step)
                    continue
            except RayError as exc:
                self.failed(exc)
                step = self.start_step()
                continue
            self.failures = 0
            step, stats = report["step"], report["workers"]
            record = {"step": step, "meta_loss": sum(s["meta_loss"] for s in stats) / len(stats),
                      "starts": [s["start"] for s in stats], "windows": [s["window"] for s in stats],
                      "grad_norm": report["grad_norm"], "applied": report["applied"], "used": report["used"],
                      "dropped_nonfinite": report["dropped"]["nonfinite"],
                      "worker_seconds": [round(s["seconds"], 4) for s in stats],
                      "seconds": round(time.perf_counter() - began, 4)}
            self.record(record)
            self.maybe_validate(step)
            self.after_step(bar, record, live=report["used"])

    def async_loop(self, bar: tqdm) -> None:
        step = self.start_step()
        bar.update(step)
        task = step * len(self.workers)  # task counter: seeds stay distinct across resumes
        inflight: dict = {}

        def submit(slot: int) -> None:
            nonlocal task
            snap = ray.get(self.ps.snapshot.remote())
            inflight[self.workers[slot].compute.remote(snap["ref"], task, slot)] = slot
            task += 1

        for slot in range(len(self.workers)):
            submit(slot)
        while step < self.cfg.steps:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            if not ready:
                self.wait(next(iter(inflight)))  # raises if the workers cannot be placed again
                continue
            slot = inflight.pop(ready[0])
            try:
                report = ray.get(self.ps.apply_async.remote(ready[0]))  # the gradient goes straight to the server
            except RayError as exc:
                self.failed(exc)
                submit(slot)
                continue
            self.failures = 0
            submit(slot)
            if not report["accepted"]:
                continue
            step, (result,) = report["step"], report["workers"]
            record = {"step": step, "meta_loss": result["meta_loss"], "starts": [result["start"]],
                      "windows": [result["window"]], "grad_norm": report["grad_norm"], "applied": report["applied"],
                      "slot": slot, "staleness": report["staleness"],
                      "dropped_stale": report["dropped"]["stale"], "dropped_nonfinite": report["dropped"]["nonfinite"]}
            self.record(record)
            self.maybe_validate(step)
            self.after_step(bar, record, live=len(inflight))
        for ref in inflight:
            ray.cancel(ref)

    def after_step(self, bar: tqdm, record: dict, live: int) -> None:
        """Progress: steps/s and ETA come from tqdm; live = workers whose gradient arrived (sync) or in flight."""
        postfix = {"meta_loss": f"{record['meta_loss']:.3f}", "workers": f"{live}/{len(self.workers)}"}
        for step, acc in self.collect_validations():
            postfix["val"] = f"{acc:.1f}@{step}"
        bar.set_postfix(postfix)
        bar.update(record["step"] - bar.n)


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (they are about to be redone after a restart)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a crash mid-write
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def distill_on_ray(cfg: DistillConfig | None, out: str | Path, *, resume: bool = False, progress: bool = True,
                   evaluate: bool = True, worker_cls: type = MetaGradWorker,
                   server_cls: type = ParameterServer, initial: SyntheticSet | None = None,
                   placement: TrialPlacement | None = None, on_validation: ValidationHook | None = None) -> dict:
    """Run (or with `resume`, continue) a distillation on Ray into `out`; returns the summary the CLI prints.

    `initial` starts from a given set (Boost-DD stages) instead of a fresh init. `worker_cls` / `server_cls` let
    tests inject failures; they must subclass MetaGradWorker / ParameterServer. `placement` puts the workers into
    a placement group that already exists (a Tune trial's) instead of a new one; `on_validation(step, val_acc,
    best_val_acc)` is called after each validation (Tune trials report from it).
    """
    run = Path(out)
    if resume:
        cfg = rundir.resumable_config(run)
        if cfg is None:
            return {"run_dir": str(run), "finished": True}
    elif run.exists() and any(run.iterdir()):
        rundir.prepare(run)  # raises: an existing run is never written into
    dataset = load_checked(cfg)  # data problems surface before anything is created
    started = connect(cfg.ray.address)
    try:
        if placement is None:
            bundle = worker_resources(cfg.ray)  # so does a request the cluster can never meet
            placement = WorkerPlacement(bundle, cfg.ray.workers, cfg.ray.placement_timeout_s)
        try:
            if not resume:
                run = rundir.prepare(run)
                rundir.write_config(run, cfg)
            job = Run(cfg, run, dataset, placement, worker_cls, server_cls, initial, on_validation)
        except BaseException:
            placement.remove()
            raise
        try:
            bar = tqdm(total=cfg.steps, desc=f"distill ({cfg.ray.mode}, K={cfg.ray.workers})", unit="step",
                       disable=not progress, dynamic_ncols=True)
            began = time.perf_counter()
            (job.sync_loop if cfg.ray.mode == "sync" else job.async_loop)(bar)
            job.collect_validations(wait=True)
            bar.close()
            result = ray.get(job.ps.result.remote())
            status = {**ray.get(job.ps.status.remote()), "placement": job.placement_report()}
        finally:
            job.shutdown()
    finally:
        if started:
            ray.shutdown()
    return finish(cfg, run, job.dataset, result, status, time.perf_counter() - began, evaluate, progress, job.blocks)


def finish(cfg, run: Path, dataset, result: dict, status: dict, seconds: float, evaluate: bool, progress: bool,
           blocks=None) -> dict:
    import torch

    soft = None if result["soft_labels"] is None else torch.tensor(result["soft_labels"])
    extra = {"selected_step": result["selected_step"], "val_acc": result["val_acc"],
             "distill_seconds": round(seconds, 1), "dropped": status["dropped"],
             "workers": cfg.ray.workers, "mode": cfg.ray.mode}
    dset = rundir.save_distilled(run, torch.tensor(result["images"]), torch.tensor(result["hard_labels"]), soft,
                                 blocks, dataset, cfg, extra=extra)
    summary = {"run_dir": str(run), **extra, "status": status}
    if evaluate:
        summary["eval"] = run_evaluation(run, dset.images, rundir.targets_of(dset), cfg, dataset,
                                         resolve_device(cfg.device), progress=progress)
    return summary
