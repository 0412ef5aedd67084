"""Boost-DD: budget-agnostic nested distilled sets.

Distil block 1 (B images per class); then, stage after stage, add a fresh block and distil the union, with the
earlier blocks' meta learning rate multiplied by beta (beta = 0 freezes them). Every prefix (the first k blocks)
is then itself a distilled set. Each stage is an ordinary run of the distributed engine in RUN/stage-N/, with its
own checkpoints, so an interrupted boost resumes stage by stage; RUN/distilled.parquet records each image's block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from raydistill.io import run_dir as rundir
from raydistill.io.artifact import BUDGETS_FILE, read_distilled
from raydistill.io.atomic import atomic_write_json
from raydistill.config.core import BoostStage, ConfigError, DistillConfig
from raydistill.distributed.local import SyntheticSet, init_synthetic, load_checked, run_evaluation
from raydistill.distributed.engine import distill_on_ray
from raydistill.runtime import resolve_device


def schedule(block: int, blocks: int, beta: float, steps_per_block: int) -> list[BoostStage]:
    """`blocks` stages of `block` images per class each; the first stage has nothing earlier to scale."""
    return [BoostStage(block=block, steps=steps_per_block, beta=beta) for _ in range(blocks)]


def stage_config(cfg: DistillConfig, stages: list[BoostStage], index: int) -> DistillConfig:
    """The config of stage `index` (0-based): the union's IPC, the stage's steps, a seed of its own."""
    ipc = sum(s.block for s in stages[: index + 1])
    return dataclasses.replace(cfg, ipc=ipc, steps=stages[index].steps, seed=cfg.seed + 1000 * index,
                               boost=dataclasses.replace(cfg.boost, stages=[]))


def add_block(previous: SyntheticSet | None, cfg: DistillConfig, block_cfg: DistillConfig, dataset, index: int,
              beta: float) -> SyntheticSet:
    """The union of the earlier blocks (lr x beta) and a freshly initialised block `index` (lr x 1)."""
    fresh = init_synthetic(dataclasses.replace(block_cfg, ipc=cfg.boost.stages[index].block), dataset)
    n_new = len(fresh.hard_labels)
    fresh_blocks = torch.full((n_new,), index, dtype=torch.int32)
    if previous is None:
        return dataclasses.replace(fresh, blocks=fresh_blocks, lr_scale=torch.ones(n_new))
    soft = None
    if previous.soft_labels is not None:
        soft = torch.cat([previous.soft_labels, fresh.soft_labels])
    return SyntheticSet(
        images=torch.cat([previous.images, fresh.images]),
        hard_labels=torch.cat([previous.hard_labels, fresh.hard_labels]),
        soft_labels=soft,
        blocks=torch.cat([previous.blocks, fresh_blocks]),
        lr_scale=torch.cat([torch.full((len(previous.images),), float(beta)), torch.ones(n_new)]),
    )


def load_stage_result(stage_dir: Path) -> SyntheticSet:
    dset = read_distilled(stage_dir / rundir.ARTIFACT)
    return SyntheticSet(dset.images, dset.labels, dset.soft_labels, blocks=dset.blocks)


def boost_on_ray(cfg: DistillConfig | None, out: str | Path, *, resume: bool = False, progress: bool = True,
                 evaluate: bool = True, budgets: list[int] | None = None, **engine) -> dict:
    """Run (or continue) a Boost-DD schedule into `out`; stage N lives in out/stage-N.

    `engine` goes to every stage's distill_on_ray (worker_cls, server_cls, placement, on_validation); the steps
    that on_validation sees count from the start of the whole schedule, not of the stage.
    """
    run = Path(out)
    if resume:
        cfg = rundir.resumable_config(run)
        if cfg is None:
            return {"run_dir": str(run), "finished": True}
    if not cfg.boost.stages:
        raise ConfigError("boost.stages: empty; give --block/--blocks or a boost.stages list in the YAML")
    dataset = load_checked(dataclasses.replace(cfg, ipc=sum(s.block for s in cfg.boost.stages)))
    if not resume:
        run = rundir.prepare(run)
        rundir.write_config(run, cfg)

    current: SyntheticSet | None = None
    stages = cfg.boost.stages
    hook = engine.pop("on_validation", None)
    for index, stage in enumerate(stages):
        stage_dir = run / f"stage-{index + 1}"
        if (stage_dir / rundir.ARTIFACT).exists():  # finished before an interruption
            current = load_stage_result(stage_dir)
            continue
        block_cfg = stage_config(cfg, stages, index)
        start = add_block(current, cfg, block_cfg, dataset, index, stage.beta)
        if progress:
            print(f"stage {index + 1}/{len(stages)}: IPC {block_cfg.ipc} (+{stage.block}), beta {stage.beta}, "
                  f"{stage.steps} steps")
        done_before = sum(s.steps for s in stages[:index])
        stage_hook = None if hook is None else (
            lambda step, acc, best, done_before=done_before: hook(done_before + step, acc, best))
        distill_on_ray(block_cfg, stage_dir, resume=stage_dir.exists(), progress=progress, evaluate=False,
                       initial=start, on_validation=stage_hook, **engine)
        current = load_stage_result(stage_dir)

    final_cfg = dataclasses.replace(cfg, ipc=sum(s.block for s in stages))
    dset = rundir.save_distilled(run, current.images, current.hard_labels, current.soft_labels, current.blocks,
                                 dataset, final_cfg, extra={"boost": [dataclasses.asdict(s) for s in stages]})
    summary = {"run_dir": str(run), "stages": len(stages), "ipc": final_cfg.ipc}
    if evaluate:
        summary["eval"] = evaluate_budgets(run, final_cfg, dataset, budgets or cumulative_budgets(stages),
                                           progress=progress)
    return summary


def cumulative_budgets(stages: list[BoostStage]) -> list[int]:
    total, out = 0, []
    for s in stages:
        total += s.block
        out.append(total)
    return out


def evaluate_budgets(run: Path, cfg: DistillConfig, dataset, budgets: list[int], archs: list[str] | None = None,
                     num_models: int | None = None, progress: bool = True) -> dict:
    """Accuracy of every nested prefix (first k images per class by block order) beside a k-per-class random subset."""
    dset = read_distilled(run / rundir.ARTIFACT)
    bad = [k for k in budgets if k < 1 or k > dset.ipc]
    if bad:
        raise ConfigError(f"--budgets: {bad[0]} is not between 1 and the set's IPC {dset.ipc}; pick budgets in that range")
    device = resolve_device(cfg.device)
    reports = {}
    for k in budgets:
        part = dset.prefix(k)
        print(f"budget IPC {k}:")
        reports[str(k)] = run_evaluation(run, part.images, rundir.targets_of(part),
                                         dataclasses.replace(cfg, ipc=k), dataset, device, archs, num_models,
                                         progress=progress, write=k == dset.ipc)  # the whole set: eval.json
    body = {"split": "test", "budgets": reports}
    atomic_write_json(run / BUDGETS_FILE, body)
    return body
