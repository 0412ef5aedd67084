"""The final evaluation report (the eval.json body): the distilled set beside same-size real baselines.

The report is planned as a list of independent `Network`s, each a pure function of its seed (see `train.py`), then
assembled from their accuracies in plan order. `evaluation_report` trains them one after another in this process;
`raydistill.evaluate.remote` trains the same plan as Ray tasks and assembles the same report.

Fairness rules:
- Networks are paired: network i of every set and variant has the same seed (init, batch order, augmentation).
- The random baseline draws a fresh subset for every network (seed + i), so its spread includes subset variance.
  Herding and k-center are deterministic selections, made once per architecture; each network is a fresh init on it.
- A baseline is never handicapped by a recipe made for the distilled set: it is trained both with the distillation's
  augmentation and without, and the report shows its better mean, naming the variant (ties go to `augmented`, the
  distilled set's own recipe). Without augmentation configured there is one recipe, and only `plain` is trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from raydistill.config import DistillConfig
from raydistill.data.registry import Dataset
from raydistill.data.selection import random_real_subset
from raydistill.evaluate.baselines import RANDOM, coreset
from raydistill.evaluate.train import Accuracy, NetworkSpec, Progress, network_accuracy, split_of

DISTILLED = "distilled"
AUGMENTED, PLAIN = "augmented", "plain"
SUBSET_SEED = 10_000  # cfg.seed + this + i: the random subset of network i
NETWORK_SEED = 20_000  # cfg.seed + this + i: network i of every set (paired)
FEATURE_SEED = 40_000  # cfg.seed + this: the untrained network whose features select the coresets
LABELS = {RANDOM: "random real subset", "herding": "herding coreset", "kcenter": "k-center coreset"}


@dataclass(frozen=True)
class Network:
    """One network of the report: a fresh `arch` trained on the training set `data` and scored on the split."""

    set: str  # "distilled" or a baseline name
    arch: str
    index: int  # its place among the networks of (set, arch, augmented)
    augmented: bool  # trained with cfg.augment, else with no augmentation
    data: str  # key of its training set in `training_sets(...)`
    seed: int


@dataclass(frozen=True)
class ReportOptions:
    """Which networks a report trains and where: `archs` / `num_models` (default: cfg.eval's), the split they are
    scored on, `tick` (called as each network finishes) and `device` (where networks train in process, and where
    the driver selects coresets)."""

    archs: list[str] | None = None
    num_models: int | None = None
    split: str = "test"
    tick: Progress | None = None
    device: torch.device = torch.device("cpu")


def baseline_names(cfg: DistillConfig) -> list[str]:
    """`random` first (every report shows it, whatever cfg.eval.baselines says), then the configured coresets."""
    return list(dict.fromkeys([RANDOM, *cfg.eval.baselines]))


def baseline_variants(cfg: DistillConfig) -> list[bool]:
    """Augmentation on/off for the baselines: both, or only off when the config has no augmentation."""
    return [True, False] if cfg.augment.strategies else [False]


def plan_networks(cfg: DistillConfig, archs: list[str], num_models: int) -> list[Network]:
    """Every network of the report, in the order their accuracies are assembled."""
    plan = []
    for arch in archs:
        seeds = [cfg.seed + NETWORK_SEED + i for i in range(num_models)]
        plan += [Network(DISTILLED, arch, i, True, DISTILLED, s) for i, s in enumerate(seeds)]
        for name in baseline_names(cfg):
            for augmented in baseline_variants(cfg):
                for i, s in enumerate(seeds):
                    data = f"{RANDOM}/{i}" if name == RANDOM else f"{name}/{arch}"
                    plan.append(Network(name, arch, i, augmented, data, s))
    return plan


def network_count(cfg: DistillConfig, archs: list[str], num_models: int) -> int:
    """How many networks a report trains (a progress bar's total)."""
    return len(plan_networks(cfg, archs, num_models))


def training_sets(plan: list[Network], x: Tensor, targets: Tensor, ipc: int, dataset: Dataset, cfg: DistillConfig,
                  device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """The training set of every network in `plan`, by its `data` key; coresets are selected on `device`."""
    sets: dict[str, tuple[Tensor, Tensor]] = {}
    for net in plan:
        if net.data in sets:
            continue
        if net.set == DISTILLED:
            sets[net.data] = (x, targets)
        elif net.set == RANDOM:
            sets[net.data] = random_real_subset(dataset, ipc, seed=cfg.seed + SUBSET_SEED + net.index)
        else:
            sets[net.data] = coreset(net.set, dataset, ipc, cfg, net.arch, cfg.seed + FEATURE_SEED, device)
    return sets


def _baseline_entry(variants: dict[str, Accuracy]) -> dict:
    best = max(variants, key=lambda v: variants[v].mean)  # the first of equals: augmented
    return {**{v: asdict(acc) for v, acc in variants.items()}, "best": best, **asdict(variants[best])}


def assemble(plan: list[Network], accs: list[float], ipc: int, cfg: DistillConfig, split: str) -> dict:
    """The report from the accuracies of `plan`'s networks, given in plan order."""
    groups: dict[tuple[str, str, bool], list[float]] = {}
    for net, acc in zip(plan, accs, strict=True):
        groups.setdefault((net.set, net.arch, net.augmented), []).append(acc)
    archs = list(dict.fromkeys(net.arch for net in plan))
    label = {True: AUGMENTED, False: PLAIN}
    results = {arch: asdict(Accuracy.of(groups[DISTILLED, arch, True])) for arch in archs}
    baselines = {
        name: {arch: _baseline_entry({label[a]: Accuracy.of(groups[name, arch, a]) for a in baseline_variants(cfg)})
               for arch in archs}
        for name in baseline_names(cfg)
    }
    return {
        "split": split,
        "ipc": ipc,
        "num_models": 1 + max(net.index for net in plan),
        "steps": cfg.eval.steps,
        "recipe": cfg.eval.recipe,
        "lr": cfg.eval.lr,
        "augment": asdict(cfg.augment),
        "results": results,
        "baseline": {arch: dict(entry) for arch, entry in baselines[RANDOM].items()},  # what older readers read
        "baselines": baselines,
    }


def evaluation_report(
    x: Tensor,
    targets: Tensor,
    ipc: int,
    dataset: Dataset,
    cfg: DistillConfig,
    options: ReportOptions = ReportOptions(),
) -> dict:
    """Accuracy of the distilled set (x, targets) and of the real baselines, per architecture, trained here.

    Keys: split, ipc, num_models, steps, recipe, lr, augment; `results[arch]` = {mean, std, accs} of the distilled
    set; `baselines[name][arch]` = {augmented, plain: {mean, std, accs}, best: the better variant's name, and its
    mean, std, accs}; `baseline[arch]` = the random baseline's entry. `options.tick` is called after each network.
    """
    archs, split, tick, device = options.archs or cfg.eval.archs, options.split, options.tick, options.device
    plan = plan_networks(cfg, archs, options.num_models or cfg.eval.num_models)
    sets = training_sets(plan, x, targets, ipc, dataset, cfg, device)
    eval_x, eval_y = (t.to(device) for t in split_of(dataset, split))
    accs = []
    for net in plan:
        train_x, train_targets = sets[net.data]
        spec = NetworkSpec(net.arch, dataset.num_classes, net.seed, cfg.eval.steps, net.augmented)
        accs.append(network_accuracy(train_x, train_targets, eval_x, eval_y, spec, cfg, device))
        if tick:
            tick()
    return assemble(plan, accs, ipc, cfg, split)


def _percent(entry: dict) -> str:
    return f"{entry['mean']:.2f} +- {entry['std']:.2f} %"


def format_report(report: dict) -> str:
    """The report as the CLI prints it: each baseline's better figure, which variant it was, and the gain over it."""
    lines = [f"{report['split']} accuracy, IPC {report['ipc']}, {report['num_models']} networks each "
             f"(baselines: the better of training with and without augmentation):"]
    for arch, res in report["results"].items():
        lines.append(f"  {arch}: distilled {_percent(res)}")
        # eval.json files written before the `baselines` key (or merged with one) hold only `baseline`
        entries = {name: per_arch[arch] for name, per_arch in report.get("baselines", {}).items() if arch in per_arch}
        if not entries and arch in report.get("baseline", {}):
            entries = {RANDOM: report["baseline"][arch]}
        for name, entry in entries.items():
            variant = f" ({entry['best']})" if "best" in entry else ""
            lines.append(f"    {LABELS.get(name, name) + ':':21s}{_percent(entry)}{variant:13s}"
                         f"gain {res['mean'] - entry['mean']:+.2f} points")
    return "\n".join(lines)
