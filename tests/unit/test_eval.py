"""Honest evaluation: fresh random subsets, baselines at their better recipe, coresets, the validator (in-process;
tests/integration/test_eval_on_ray.py: the same on Ray).

The `fashion` and `one_thread` fixtures are conftest.py's."""

from __future__ import annotations

import pytest
import torch

from helpers import eval_config as tiny, expected_validation, needs_fashion, snapshot_of, stand_in_set as distilled
from raydistill.engine.worker import ValidatorActor, validator_options
from raydistill.evaluate.baselines import coreset, herding_indices, kcenter_indices
from raydistill.evaluate.report import (
    ReportOptions,
    assemble,
    evaluation_report,
    format_report,
    network_count,
    plan_networks,
    training_sets,
)

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- the plan


def test_every_network_is_planned_once_and_paired_across_sets():
    cfg = tiny("eval.baselines=[random,kcenter]")
    plan = plan_networks(cfg, ["convnet", "alexnet"], 3)
    # per arch: 3 distilled + 2 baselines x 2 variants x 3
    assert len(plan) == network_count(cfg, ["convnet", "alexnet"], 3) == 2 * (3 + 2 * 2 * 3)
    assert len(set(plan)) == len(plan)
    # network i has the same seed in every set and variant: the comparison is paired
    assert {(n.index, n.seed) for n in plan} == {(i, cfg.seed + 20_000 + i) for i in range(3)}


def test_without_augmentation_baselines_train_one_plain_variant():
    plan = plan_networks(tiny("augment.strategies=[]"), ["convnet"], 2)
    assert {n.augmented for n in plan if n.set == "random"} == {False}


@needs_fashion
def test_random_baseline_draws_a_fresh_subset_for_every_network(fashion):
    cfg = tiny()
    x, y = distilled(fashion)
    plan = plan_networks(cfg, ["convnet", "vgg11"], 3)
    sets = training_sets(plan, x, y, 2, fashion, cfg, CPU)
    subsets = [sets[f"random/{i}"] for i in range(3)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not torch.equal(subsets[a][0], subsets[b][0])
    for images, labels in subsets:  # each is a same-size, class-major real subset
        assert images.shape == (20, 1, 28, 28) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    # one subset per network index, shared by architectures and variants (paired), and nothing else
    assert sorted(k for k in sets if k.startswith("random/")) == ["random/0", "random/1", "random/2"]


@needs_fashion
def test_the_same_seed_gives_the_same_report(fashion):
    cfg = tiny()
    x, y = distilled(fashion)
    a = evaluation_report(x, y, 1, fashion, cfg, ReportOptions(device=CPU))
    assert a == evaluation_report(x, y, 1, fashion, cfg, ReportOptions(device=CPU))
    assert a != evaluation_report(x, y, 1, fashion, tiny("seed=1"), ReportOptions(device=CPU))


# ---------------------------------------------------------------------------------------------- better of two recipes


def hand_made_report(cfg, random_aug, random_plain):
    """The report `assemble` builds from given accuracies (distilled: 50 %), no training involved."""
    plan = plan_networks(cfg, ["convnet"], 2)
    given = {("distilled", True): [50.0, 50.0], ("random", True): random_aug, ("random", False): random_plain}
    accs = [given[n.set, n.augmented][n.index] for n in plan]
    return assemble(plan, accs, 1, cfg, "test")


def test_a_baseline_reports_its_better_variant_and_keeps_both():
    report = hand_made_report(tiny(), random_aug=[40.0, 42.0], random_plain=[45.0, 49.0])
    entry = report["baselines"]["random"]["convnet"]
    assert entry["augmented"]["accs"] == [40.0, 42.0] and entry["plain"]["accs"] == [45.0, 49.0]
    assert entry["best"] == "plain" and entry["mean"] == 47.0 and entry["std"] == 2.0 and entry["accs"] == [45, 49]
    assert report["baseline"]["convnet"] == entry  # the key older readers use holds the random baseline's best
    assert report["results"]["convnet"] == {"mean": 50.0, "std": 0.0, "accs": [50.0, 50.0]}
    text = format_report(report)
    assert "random real subset" in text and "47.00 +- 2.00 % (plain)" in text and "gain +3.00 points" in text


def test_augmentation_wins_when_it_is_better_and_on_ties():
    better = hand_made_report(tiny(), random_aug=[46.0, 48.0], random_plain=[45.0, 47.0])
    assert better["baselines"]["random"]["convnet"]["best"] == "augmented"
    tie = hand_made_report(tiny(), random_aug=[45.0, 47.0], random_plain=[47.0, 45.0])
    assert tie["baselines"]["random"]["convnet"]["best"] == "augmented"  # the distilled set's own recipe


@needs_fashion
def test_a_trained_report_holds_both_variants_of_every_baseline(fashion):
    cfg = tiny("eval.baselines=[random,herding]")
    x, y = distilled(fashion)
    ticks = []
    report = evaluation_report(x, y, 1, fashion, cfg, ReportOptions(tick=lambda: ticks.append(1), device=CPU))
    assert len(ticks) == network_count(cfg, ["convnet"], 2) == 2 + 2 * 2 * 2
    assert set(report["baselines"]) == {"random", "herding"}
    for entry in (report["baselines"][name]["convnet"] for name in ("random", "herding")):
        means = {v: entry[v]["mean"] for v in ("augmented", "plain")}
        assert entry["mean"] == max(means.values()) == means[entry["best"]]
        assert len(entry["accs"]) == 2 and all(0 <= a <= 100 for a in entry["accs"])
    assert "herding coreset" in format_report(report)


# ---------------------------------------------------------------------------------------------- coresets


def greedy_mean_matching(points: list[list[float]], k: int) -> list[int]:
    """Herding written out by hand: add the point that brings the running mean closest to the mean of all."""
    dim = len(points[0])
    mean = [sum(p[d] for p in points) / len(points) for d in range(dim)]
    picks: list[int] = []
    for step in range(1, k + 1):
        def gap(i):
            return sum((mean[d] - (sum(points[j][d] for j in picks) + points[i][d]) / step) ** 2 for d in range(dim))
        picks.append(min((i for i in range(len(points)) if i not in picks), key=gap))
    return picks


def test_herding_picks_what_greedy_mean_matching_picks():
    features = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    picks = herding_indices(features, 6)
    assert picks.tolist() == greedy_mean_matching(features.tolist(), 6)
    assert len(set(picks.tolist())) == 6


def test_herding_on_a_line():
    # mean 3.2: first 3.0 (index 3); then (3 + f) / 2 closest to 3.2 wants f = 3.4: 2.0 (index 2)
    assert herding_indices(torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]]), 2).tolist() == [3, 2]


def test_kcenter_starts_near_the_mean_then_takes_the_farthest_points():
    # mean 1.6: start at 2 (index 2); farthest from {2} is 10; then -5 (7 away from 2) beats 0 (2 away)
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [-5.0]])
    assert kcenter_indices(points, 3).tolist() == [2, 3, 4]
    assert sorted(kcenter_indices(points, 5).tolist()) == [0, 1, 2, 3, 4]  # never a duplicate


@needs_fashion
@pytest.mark.parametrize("name", ["herding", "kcenter"])
def test_a_coreset_is_ipc_distinct_images_per_class_and_deterministic(fashion, name):
    cfg = tiny()
    x, y = coreset(name, fashion, 3, cfg, "convnet", seed=5, device=CPU)
    assert y.tolist() == [c for c in range(10) for _ in range(3)]
    assert len({tuple(img.flatten()[::7].tolist()) for img in x}) == 30
    again, _ = coreset(name, fashion, 3, cfg, "convnet", seed=5, device=CPU)
    assert torch.equal(x, again)


# ---------------------------------------------------------------------------------------------- the validator


@needs_fashion
@pytest.mark.parametrize("soft", [False, True])
def test_the_validator_returns_validation_accuracy(fashion, one_thread, soft):
    cfg = tiny()
    snapshot = snapshot_of(fashion, soft)
    assert ValidatorActor(cfg).validate(snapshot) == expected_validation(snapshot, fashion, cfg)


def test_validator_options_share_a_gpu_and_never_take_a_cpu():
    on_gpus, on_cpus = validator_options(has_gpus=True), validator_options(has_gpus=False)
    assert on_gpus["num_gpus"] == 0.25 and on_gpus["num_cpus"] == 0
    assert "num_gpus" not in on_cpus and on_cpus["num_cpus"] == 0
