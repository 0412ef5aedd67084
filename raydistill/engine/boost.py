"""Boost-DD on the engine: each stage is an ordinary run in RUN/stage-N/, with its own checkpoints, so an
interrupted boost resumes stage by stage; RUN/distilled.parquet records each image's block.

The schedule and the blocks themselves (what is distilled when, how a block joins) are raydistill.synset.blocks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ray
import torch

from raydistill.config import ConfigError, DistillConfig
from raydistill.engine.driver import Hooks, distill
from raydistill.engine.memory import fit_changes
from raydistill.evaluate.results import EvalOptions, run_evaluation
from raydistill.methods.base import IMAGES, SOFT_LABELS
from raydistill.methods.registry import get_method
from raydistill.plan import with_changes
from raydistill.runtime import connect
from raydistill.setup import load_checked
from raydistill.storage import run_dir as rundir
from raydistill.storage.artifact import BUDGETS_FILE, read_distilled
from raydistill.storage.atomic import atomic_write_json
from raydistill.synset.blocks import add_block, cumulative_budgets, stage_config, total_ipc
from raydistill.synset.synthetic import SyntheticSet


def load_stage_result(stage: Path) -> SyntheticSet:
    dset = read_distilled(stage / rundir.ARTIFACT)
    learnables = {IMAGES: dset.images}
    if dset.soft_labels is not None:
        learnables[SOFT_LABELS] = dset.soft_labels
    learnables.update({k: torch.tensor(v) for k, v in dset.metadata.get("learned", {}).items()})
    return SyntheticSet(learnables, dset.labels, blocks=dset.blocks)


def boost(cfg: DistillConfig | None, out: str | Path, *, resume: bool = False, progress: bool = True,
          evaluate: bool = True, budgets: list[int] | None = None, **engine) -> dict:
    """Run (or continue) a Boost-DD schedule into `out`; stage N lives in out/stage-N.

    `engine` goes to every stage's `distill` (in_process, hooks); each stage starts from the previous stage's set
    (its hooks' `initial`), and the steps that the hooks' on_validation sees count from the start of the whole
    schedule, not of the stage. The hooks' `fit` (the pre-launch memory check) is made once, for the whole set.
    """
    run, cfg = rundir.open_run(out, cfg, resume)
    if cfg is None:
        return {"run_dir": str(run), "finished": True}
    if not cfg.boost.stages:
        raise ConfigError("boost.stages: empty; give --block/--blocks or a boost.stages list in the YAML")
    final_cfg = dataclasses.replace(cfg, ipc=total_ipc(cfg))
    dataset = load_checked(final_cfg)
    in_process = engine.get("in_process", False)
    started = False if in_process else connect(cfg.ray.address)  # one Ray for every stage
    try:
        if not resume:  # the memory check of the largest stage (the whole set); its changes hold for every stage
            changes = fit_changes(final_cfg, dataset, in_process, engine.get("hooks", Hooks()).fit)
            if changes:
                cfg = with_changes(cfg, changes)
                final_cfg = dataclasses.replace(cfg, ipc=total_ipc(cfg))
            run = rundir.create(run, cfg)
        return _run_stages(cfg, run, dataset, StageOptions(progress, evaluate, budgets), engine)
    finally:
        if started:
            ray.shutdown()


@dataclasses.dataclass(frozen=True)
class StageOptions:
    progress: bool
    evaluate: bool
    budgets: list[int] | None


def _run_stages(cfg: DistillConfig, run, dataset, options: StageOptions, engine: dict) -> dict:
    progress, evaluate, budgets = options.progress, options.evaluate, options.budgets
    final_cfg = dataclasses.replace(cfg, ipc=total_ipc(cfg))

    method = get_method(cfg.method)
    current: SyntheticSet | None = None
    stages = cfg.boost.stages
    hooks = engine.pop("hooks", Hooks())
    hook = hooks.on_validation
    for index, stage in enumerate(stages):
        folder = rundir.stage_dir(run, index)
        if (folder / rundir.ARTIFACT).exists():  # finished before an interruption
            current = load_stage_result(folder)
            continue
        block_cfg = stage_config(cfg, index)
        start = add_block(current, cfg, index, dataset, method)
        if progress:
            print(f"stage {index + 1}/{len(stages)}: IPC {block_cfg.ipc} (+{stage.block}), beta {stage.beta}, "
                  f"{stage.steps} steps")
        done_before = sum(s.steps for s in stages[:index])
        stage_hook = None if hook is None else (
            lambda step, acc, best, done_before=done_before: hook(done_before + step, acc, best))
        distill(block_cfg, folder, resume=folder.exists(), progress=progress, evaluate=False,
                hooks=dataclasses.replace(hooks, initial=start, on_validation=stage_hook, fit="off"), **engine)
        current = load_stage_result(folder)

    rundir.save_distilled(run, current.learnables, current.hard_labels, current.blocks, dataset, final_cfg,
                          extra={"boost": [dataclasses.asdict(s) for s in stages]})
    summary = {"run_dir": str(run), "stages": len(stages), "ipc": final_cfg.ipc}
    if evaluate:
        summary["eval"] = evaluate_budgets(run, final_cfg, dataset, budgets or cumulative_budgets(stages),
                                           EvalOptions(progress=progress, on_ray=not engine.get("in_process", False)))
    return summary


def evaluate_budgets(run: Path, cfg: DistillConfig, dataset, budgets: list[int],
                     options: EvalOptions = EvalOptions()) -> dict:
    """Accuracy of every nested prefix (first k images per class by block order) beside same-size baselines; only
    the whole set's report is written as eval.json (whatever `options.write` says)."""
    dset = read_distilled(run / rundir.ARTIFACT)
    bad = [k for k in budgets if k < 1 or k > dset.ipc]
    if bad:
        raise ConfigError(f"--budgets: {bad[0]} is not between 1 and the set's IPC {dset.ipc}; pick budgets in that range")
    reports = {}
    for k in budgets:
        part = dset.prefix(k)
        print(f"budget IPC {k}:")
        budget_options = dataclasses.replace(options, write=k == dset.ipc)  # the whole set: eval.json
        reports[str(k)] = run_evaluation(run, part.images, rundir.targets_of(part), dataclasses.replace(cfg, ipc=k),
                                         dataset, budget_options)
    body = {"split": "test", "budgets": reports}
    atomic_write_json(run / BUDGETS_FILE, body)
    return body
