"""The outer loop: one driver for every run, on Ray or in this process.

A run is a parameter server, K gradient workers and a validator. On Ray they are actors (the server beside the
driver, the workers in a placement group, the validator caching the validation split); in process they are plain
objects behind the same calls (raydistill.engine.backend), so the metric records, the best-snapshot selection
and the run directory are the same either way.

Sync mode: every meta-step, K workers each compute the method's gradient for their own slot on the same snapshot;
the server averages the K gradients into one update (K = 1 is the single-machine algorithm, bit for bit). Async mode:
the server applies gradients as they arrive and drops those more than `ray.max_staleness` versions old.

Failures: workers and the server restart on their own (max_restarts=-1); a task is retried with the same seed, so it
recomputes the same gradient; the server resumes from its last checkpoint and the driver asks it which step comes
next, so no step is lost or applied twice. A killed driver continues with `--resume RUN_DIR`.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from tqdm import tqdm

from raydistill.config import DistillConfig
from raydistill.data.registry import Dataset
from raydistill.engine.backend import BACKENDS
from raydistill.engine.cluster import WorkerPlacement, driver_node_strategy, placement_state, worker_resources
from raydistill.engine.memory import fit_changes
from raydistill.engine.metrics_log import add_missing_step, keep_metrics_up_to, step_record
from raydistill.engine.server import ParameterServer
from raydistill.engine.shared_data import share
from raydistill.engine.worker import GradientWorker, ValidatorActor, validator_options, worker_options
from raydistill.evaluate.results import EvalOptions, RunOutcome, finish
from raydistill.methods.registry import get_method
from raydistill.plan import with_changes
from raydistill.runtime import SMALL_NETWORK_GPU_SHARE, connect
from raydistill.setup import load_checked
from raydistill.storage import run_dir as rundir
from raydistill.storage.atomic import append_jsonl
from raydistill.storage.checkpoint import CheckpointWarning
from raydistill.storage.store import check_shared, location, one_line, publish_local_dir
from raydistill.synset.synthetic import SyntheticSet, init_synthetic
from raydistill.watch.progress import progress_bar
from raydistill.watch.run import RunWatch
from raydistill.watch.trackers import check_usable

ValidationHook = Callable[[int, float, float], None]  # (step, val_acc, best val_acc so far)


@dataclass(frozen=True)
class Hooks:
    """What tests, Boost-DD and Tune change in a run: `worker_cls` / `server_cls` inject failures (subclasses of
    GradientWorker / ParameterServer); `initial` starts from a given set (a Boost-DD stage) instead of a fresh init;
    `placement` puts the workers into a placement group that already exists (a Tune trial's);
    `on_validation(step, val_acc, best_val_acc)` is called after each validation."""

    worker_cls: type = GradientWorker
    server_cls: type = ParameterServer
    initial: SyntheticSet | None = None
    placement: WorkerPlacement | None = None
    on_validation: ValidationHook | None = None
    fit: str = "check"  # a new run's memory check before it starts (raydistill.plan.check): check, auto or off


class EngineError(RuntimeError):
    """A run that cannot go on (one line: what happened and what to do); its checkpoints stay usable."""


def snapshot_for_validation(current: dict) -> dict:
    """What the validator scores: images, hard labels and soft labels (when learned) of a server snapshot."""
    learnables = current["learnables"]
    return {"images": learnables["images"], "hard_labels": current["hard_labels"],
            "soft_labels": learnables.get("soft_labels"), "learnables": learnables}


def validator_gets_gpu(cfg: DistillConfig) -> bool:
    """Whether a validator's GPU share is left once the run's workers hold theirs (it takes one only then)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    return gpus > 0 and gpus - cfg.ray.workers * cfg.ray.gpus_per_worker >= SMALL_NETWORK_GPU_SHARE


class Run:
    """The actors of one run and the driver-side bookkeeping (metrics, pending validations)."""

    def __init__(self, cfg: DistillConfig, run: Path, syn: SyntheticSet, backend: str, dataset: Dataset,
                 hooks: Hooks):
        """`hooks.placement` is the workers' placement group (None in process); `hooks.initial` is not read."""
        placement, self.on_validation = hooks.placement, hooks.on_validation
        self.cfg, self.run, self.placement = cfg, run, placement
        self.watch = RunWatch(cfg, run, dataset)  # TensorBoard and trackers
        self.backend = BACKENDS[backend]
        on_ray = backend == "ray"
        self.ps = self.backend.actor(
            hooks.server_cls, dict(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                             scheduling_strategy=driver_node_strategy()) if on_ray else {},
            cfg, str(run), backend)
        # The real data: one uint8 copy per node, read in place; every task carries the one ref to its refs.
        self.data = self.backend.reference(share(dataset, cfg, self.backend))
        self.workers = [
            self.backend.actor(hooks.worker_cls, worker_options(cfg, placement.options(i)) if on_ray else {},
                               cfg, backend)
            for i in range(cfg.ray.workers)
        ]
        self.validator = None
        if cfg.eval.every:
            options = validator_options(validator_gets_gpu(cfg), cfg.ray.reuse_memory) if on_ray else {}  # no Ray
            self.validator = self.backend.actor(ValidatorActor, options, cfg, backend)
        self.backend.get(self.ps.start.remote(  # a failed step-0 checkpoint is written again by flush_checkpoint
            syn.arrays(), syn.hard_labels.numpy(), None if syn.lr_scale is None else syn.lr_scale.numpy()))
        self.pending: dict = {}  # validation ref -> (step, snapshot ref owned by the driver)
        self.failures = 0
        self.notes_shown: set[str] = set()
        self.last_recorded = 0  # the last meta-step with a line in metrics.jsonl

    # ------------------------------------------------------------------------------------------ bookkeeping

    def start_step(self) -> int:
        status = self.backend.get(self.ps.status.remote())
        for note in status["notes"]:  # e.g. a damaged checkpoint the server skipped
            if note not in self.notes_shown:
                self.notes_shown.add(note)
                warnings.warn(note, CheckpointWarning, stacklevel=2)
        step = status["step"]
        self.write(keep_metrics_up_to, self.run / rundir.METRICS, step)  # steps after the checkpoint are redone
        self.last_recorded = step
        self.watch.restart(step)
        if status["last_report"] is not None and status["last_report"]["step"] == step:  # see metrics_log
            record = step_record(status["last_report"], recovered=True)
            if self.write(add_missing_step, self.run / rundir.METRICS, record):
                self.watch.step(record, timed=False)
        return step

    def record(self, record: dict) -> None:
        if record["step"] <= self.last_recorded and "val_acc" not in record:
            # The server went back to a checkpoint without this loop seeing an error (Ray retried a call on the
            # restarted server): the steps after it are being redone, so their old lines go, as in start_step.
            self.write(keep_metrics_up_to, self.run / rundir.METRICS, record["step"] - 1)
            self.watch.restart(record["step"] - 1)
        self.write(append_jsonl, self.run / rundir.METRICS, record)
        if "val_acc" not in record:
            self.last_recorded = record["step"]

    def write(self, fn, path: Path, *args) -> None:
        """A driver-side write, retried with backoff; past ray.write_retries it stops the run in one line."""
        for attempt in range(1, self.cfg.ray.write_retries + 1):
            try:
                return fn(path, *args)
            except OSError as exc:
                error = f"{exc.strerror or one_line(exc)} ({exc.filename or path})"
                if attempt == self.cfg.ray.write_retries:
                    raise EngineError(f"cannot write {path}: {error}, {attempt} tries; fix the storage, then "
                                      f"continue with: {rundir.resume_command(self.run)}") from None
                tqdm.write(f"raydistill: writing {path} failed ({error}); retrying ({attempt}/"
                           f"{self.cfg.ray.write_retries})", file=sys.stderr)
                time.sleep(backoff(attempt))

    def check_checkpoint(self, report: dict) -> None:
        """The server reports a failed checkpoint write instead of raising; warn, back off, and give up past
        ray.write_retries failures in a row (the last good checkpoint stays usable)."""
        if report.get("checkpoint_error") is None:
            return
        failures = report["checkpoint_failures"]
        where = self.run / rundir.CHECKPOINTS
        if failures >= self.cfg.ray.write_retries:
            raise EngineError(f"checkpoint writes to {where} failed {failures} times in a row "
                              f"({report['checkpoint_error']}); fix the storage, then continue with: "
                              f"{rundir.resume_command(self.run)}")
        tqdm.write(f"raydistill: checkpoint write failed at step {report['step']} ({report['checkpoint_error']}); "
                   f"retrying at the next step ({failures}/{self.cfg.ray.write_retries})", file=sys.stderr)
        time.sleep(backoff(failures))

    def flush_checkpoint(self) -> None:
        """At the end of a run, a checkpoint that failed is written again (with backoff) or the run stops."""
        while (error := self.backend.get(self.ps.flush.remote())) is not None:
            status = self.backend.get(self.ps.status.remote())
            self.check_checkpoint({"checkpoint_error": error, "step": status["step"],
                                   "checkpoint_failures": status["checkpoint_failures"]})

    def maybe_validate(self, step: int) -> None:
        every = self.cfg.eval.every
        if every and (step % every == 0 or step == self.cfg.steps):
            # Owned by the driver: it survives a server restart.
            current = snapshot_for_validation(self.backend.get(self.ps.current.remote()))
            snapshot = self.backend.put(current)
            self.pending[self.validator.validate.remote(snapshot, self.data)] = (step, snapshot)
            self.watch.images(step, current)

    def collect_validations(self, wait: bool = False) -> list[tuple[int, float]]:
        done = []
        while self.pending:
            refs = list(self.pending)
            ready, _ = self.backend.wait(refs, num_returns=len(refs) if wait else 1, timeout=None if wait else 0)
            if not ready:
                break
            for ref in ready:
                step, snapshot = self.pending.pop(ref)
                acc = self.backend.get(ref)
                self.backend.get(self.ps.offer_best.remote(step, acc, snapshot))
                self.record({"step": step, "val_acc": acc})
                self.watch.validation(step, acc)
                done.append((step, acc))
                if self.on_validation is not None:
                    self.on_validation(step, acc, self.backend.get(self.ps.status.remote())["best_val_acc"])
        return done

    def wait(self, ref):
        """get() that notices when the workers lost their resources for good (it would otherwise wait forever).

        A worker whose node died waits in Ray's restart queue without failing any task; if its placement-group
        bundle has not been placed again within ray.placement_timeout_s, the run stops with a clear error.
        """
        if self.placement is None:
            return self.backend.get(ref)
        unplaced_since = None
        while True:
            ready, _ = self.backend.wait([ref], timeout=5.0)
            if ready:
                return self.backend.get(ref)
            if placement_state(self.placement.group) == "CREATED":
                unplaced_since = None
            elif unplaced_since is None:
                unplaced_since = time.monotonic()
            elif time.monotonic() - unplaced_since > self.cfg.ray.placement_timeout_s:
                raise EngineError(
                    f"workers lost their resources (a node left the cluster?) and could not be placed again within "
                    f"ray.placement_timeout_s={self.cfg.ray.placement_timeout_s:g} s; add capacity, then continue "
                    f"with: {rundir.resume_command(self.run)}")

    def failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures > self.cfg.ray.max_consecutive_failures:
            raise EngineError(f"{self.failures} consecutive failures, the last: {root_cause(exc)}; "
                              f"fix the cause, then continue with: {rundir.resume_command(self.run)}") from exc
        time.sleep(min(0.1 * self.failures, 2.0))

    def placement_report(self) -> list[dict]:
        """Where each worker runs now (node, device): workers may have moved after a restart."""
        return self.backend.get([w.where.remote() for w in self.workers])

    def shutdown(self) -> None:
        for actor in [self.ps, *self.workers, *([self.validator] if self.validator is not None else [])]:
            self.backend.kill(actor)
        self.watch.close()
        if self.placement is not None:
            self.placement.remove()

    # ------------------------------------------------------------------------------------------ the loops

    def sync_loop(self, bar: tqdm) -> None:
        step = self.start_step()
        bar.update(step)
        while step < self.cfg.steps:
            began = time.perf_counter()
            try:
                snap = self.backend.get(self.ps.snapshot.remote())
                step = snap["step"]
                grads = [w.compute.remote(self.data, snap["ref"], step, slot) for slot, w in enumerate(self.workers)]
                # Gradients go from the workers straight to the server; the driver only waits for the outcome.
                report = self.wait(self.ps.apply_sync.remote(step, *grads))
                if not report["accepted"]:  # the server restarted from a checkpoint: carry on from its step
                    step = self.start_step()
                    bar.reset(total=self.cfg.steps)
                    bar.update(step)
                    continue
            except self.backend.retryable as exc:
                self.failed(exc)
                step = self.start_step()
                continue
            self.failures = 0
            step, record = report["step"], step_record(report, seconds=round(time.perf_counter() - began, 4))
            self.record(record)
            self.check_checkpoint(report)
            self.maybe_validate(step)
            self.after_step(bar, record, live=report["used"])

    def async_loop(self, bar: tqdm) -> None:
        step = self.start_step()
        bar.update(step)
        task = step * len(self.workers)  # task counter: seeds stay distinct across resumes
        inflight: dict = {}

        def submit(slot: int) -> None:
            nonlocal task
            snap = self.backend.get(self.ps.snapshot.remote())
            inflight[self.workers[slot].compute.remote(self.data, snap["ref"], task, slot)] = slot
            task += 1

        for slot in range(len(self.workers)):
            submit(slot)
        while step < self.cfg.steps:
            ready, _ = self.backend.wait(list(inflight), num_returns=1, timeout=5.0)
            if not ready:
                self.wait(next(iter(inflight)))  # raises if the workers cannot be placed again
                continue
            slot = inflight.pop(ready[0])
            try:
                report = self.backend.get(self.ps.apply_async.remote(ready[0]))  # straight to the server
            except self.backend.retryable as exc:
                self.failed(exc)
                submit(slot)
                continue
            self.failures = 0
            submit(slot)
            if not report["accepted"]:
                continue
            step, record = report["step"], step_record(report, slot=slot)
            self.record(record)
            self.check_checkpoint(report)
            self.maybe_validate(step)
            self.after_step(bar, record, live=len(inflight))
        for ref in inflight:
            self.backend.cancel(ref)

    def after_step(self, bar: tqdm, record: dict, live: int) -> None:
        """Progress (bar or lines, with steps/s and ETA) and TensorBoard; live = workers whose gradient arrived
        (sync) or in flight (async)."""
        self.watch.step(record)
        postfix = {"meta_loss": f"{record['meta_loss']:.3f}", "workers": f"{live}/{len(self.workers)}"}
        for step, acc in self.collect_validations():
            postfix["val"] = f"{acc:.1f}@{step}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(record["step"] - bar.n)


def root_cause(exc: BaseException) -> str:
    """The innermost error of a (chain of) Ray task errors, in one line: `KeyError: 'x'`, not Ray's task header."""
    while getattr(exc, "cause", None) is not None:  # RayTaskError wraps the task's own exception (and its inputs')
        exc = exc.cause
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"


def backoff(attempt: int) -> float:
    """Seconds to wait before write attempt `attempt + 1`: 0.5, 1, 2, 4, then 8 at most."""
    return min(0.5 * 2 ** (attempt - 1), 8.0)


def distill(cfg: DistillConfig | None, out: str | Path, *, in_process: bool = False, resume: bool = False,
            progress: bool = True, evaluate: bool = True, hooks: Hooks = Hooks()) -> dict:
    """Run (or with `resume`, continue) a distillation into `out`; returns the summary the CLI prints.

    On Ray by default (an embedded local Ray, RAY_ADDRESS, or cfg.ray.address); `in_process=True` runs the same
    loop with the server, workers and validator as objects in this process. `hooks` (see Hooks) let tests, Boost-DD
    stages and Tune trials change the actors, the starting set, the placement and what happens after a validation.
    """
    if not in_process:
        check_shared(location(out))  # every node must see the run directory: first, whatever else is wrong
    run, cfg = rundir.open_run(out, cfg, resume)
    if cfg is None:
        return {"run_dir": str(run), "finished": True}
    dataset = load_checked(cfg)  # data problems surface before anything is created
    check_usable(cfg.trackers)  # the trackers' packages (and a W&B key) are on this machine
    backend = "local" if in_process else "ray"
    started = False if in_process else connect(cfg.ray.address)
    placement = hooks.placement
    try:
        if not resume:
            changes = fit_changes(cfg, dataset, in_process, hooks.fit)
            cfg = with_changes(cfg, changes) if changes else cfg
        if placement is None and not in_process:
            bundle = worker_resources(cfg.ray)  # so does a request the cluster can never meet
            placement = WorkerPlacement(bundle, cfg.ray.workers, cfg.ray.placement_timeout_s)
        try:
            if not resume:
                run = rundir.create(run, cfg)
            syn = hooks.initial if hooks.initial is not None else init_synthetic(cfg, dataset, get_method(cfg.method))
            job = Run(cfg, run, syn, backend, dataset, replace(hooks, placement=placement))
        except BaseException:
            if placement is not None:
                placement.remove()
            raise
        try:
            bar = progress_bar(cfg.steps, f"distill ({cfg.ray.mode}, K={cfg.ray.workers})", enabled=progress)
            began = time.perf_counter()
            job.flush_checkpoint()  # the step-0 checkpoint, if its write failed
            (job.sync_loop if cfg.ray.mode == "sync" else job.async_loop)(bar)
            for step, acc in job.collect_validations(wait=True):
                bar.set_postfix(val=f"{acc:.1f}@{step}")
            job.flush_checkpoint()
            bar.close()
            result = job.backend.get(job.ps.result.remote())
            status = {**job.backend.get(job.ps.status.remote()), "placement": job.placement_report()}
        finally:
            job.shutdown()
            publish_local_dir(run)
        outcome = RunOutcome(result, status, time.perf_counter() - began, syn.blocks)
        return finish(cfg, run, dataset, outcome, EvalOptions(progress=progress, on_ray=not in_process) if evaluate
                      else None)
    finally:
        if started:
            ray.shutdown()
