"""Boost-DD's schedule and blocks: which stage distils which union, and how a new block joins the earlier ones.

Distil block 1 (B images per class); then, stage after stage, add a fresh block and distil the union, with the
earlier blocks' meta learning rate multiplied by beta (beta = 0 freezes them). Every prefix (the first k blocks) is
then itself a distilled set. The driver that runs the stages is raydistill.engine.boost.
"""

from __future__ import annotations

import dataclasses

import torch

from raydistill.config import BoostStage, DistillConfig
from raydistill.data.registry import Dataset
from raydistill.methods.base import Method
from raydistill.synset.synthetic import SyntheticSet, init_synthetic


def schedule(block: int, blocks: int, beta: float, steps_per_block: int) -> list[BoostStage]:
    """`blocks` stages of `block` images per class each; the first stage has nothing earlier to scale."""
    return [BoostStage(block=block, steps=steps_per_block, beta=beta) for _ in range(blocks)]


def cumulative_budgets(stages: list[BoostStage]) -> list[int]:
    """The IPC after each stage: the nested budgets a boosted set is good at."""
    total, out = 0, []
    for s in stages:
        total += s.block
        out.append(total)
    return out


def total_ipc(cfg: DistillConfig) -> int:
    return sum(s.block for s in cfg.boost.stages) if cfg.boost.stages else cfg.ipc


def stage_config(cfg: DistillConfig, index: int) -> DistillConfig:
    """The config of stage `index` (0-based): the union's IPC, the stage's steps, a seed of its own."""
    stages = cfg.boost.stages
    return dataclasses.replace(cfg, ipc=cumulative_budgets(stages)[index], steps=stages[index].steps,
                               seed=cfg.seed + 1000 * index, boost=dataclasses.replace(cfg.boost, stages=[]))


def add_block(previous: SyntheticSet | None, cfg: DistillConfig, index: int, dataset: Dataset,
              method: Method) -> SyntheticSet:
    """The union of the earlier blocks (lr x beta) and a freshly initialised block `index` (lr x 1).

    Per-example learnables (images, labels, ...) are concatenated; a learnable shared by all examples (say a
    learned inner learning rate) carries on from the earlier stages.
    """
    stage = cfg.boost.stages[index]
    block_cfg = dataclasses.replace(stage_config(cfg, index), ipc=stage.block)
    fresh = init_synthetic(block_cfg, dataset, method)
    n_new = len(fresh.hard_labels)
    fresh_blocks = torch.full((n_new,), index, dtype=torch.int32)
    if previous is None:
        return dataclasses.replace(fresh, blocks=fresh_blocks, lr_scale=torch.ones(n_new))
    specs = method.learnables(cfg)
    learnables = {name: torch.cat([previous.learnables[name], fresh.learnables[name]]) if specs[name].per_example
                  else previous.learnables[name] for name in specs}
    return SyntheticSet(
        learnables=learnables,
        hard_labels=torch.cat([previous.hard_labels, fresh.hard_labels]),
        blocks=torch.cat([previous.blocks, fresh_blocks]),
        lr_scale=torch.cat([torch.full((len(previous.images),), float(stage.beta)), torch.ones(n_new)]),
    )
