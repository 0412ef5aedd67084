"""Boost-DD without a run: frozen examples at lr scale 0, the stage checks, a schedule as a YAML list."""

import torch

from raydistill.cli import main
from raydistill.config import MetaOptConfig
from raydistill.methods.base import Learnable
from raydistill.setup import load_config
from raydistill.synset.meta_update import MetaOptimizer


def test_zero_lr_scale_leaves_those_examples_bit_identical():
    images = torch.randn(6, 1, 4, 4)
    scale = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    specs = {"images": Learnable(), "soft_labels": Learnable(clamp_min=0.0)}
    opt = MetaOptimizer({"images": images, "soft_labels": torch.eye(2).repeat(3, 1)}, specs, MetaOptConfig(lr=0.1),
                        example_lr_scale=scale)
    for _ in range(5):
        opt.step({"images": torch.randn_like(images), "soft_labels": torch.randn(6, 2)})
    assert torch.equal(opt.tensors["images"][:3], images[:3])
    assert torch.equal(opt.tensors["soft_labels"][:3], torch.eye(2).repeat(3, 1)[:3])
    assert not torch.equal(opt.tensors["images"][3:], images[3:])


def test_boost_stage_beta_must_be_a_fraction(capsys):
    assert main(["boost", "--block", "1", "--blocks", "2", "--beta", "2", "--out", "/tmp/never"]) == 2
    assert "boost.stages[0].beta: must be in [0, 1]" in capsys.readouterr().err
    assert main(["boost", "--block", "1"]) == 2
    assert "--block/--blocks: give both" in capsys.readouterr().err


def test_a_boost_schedule_can_be_a_yaml_list(tmp_path):
    path = tmp_path / "sched.yaml"
    path.write_text("ipc: 1\nboost:\n  stages:\n    - {block: 1, steps: 50, beta: 0.0}\n"
                    "    - {block: 2, steps: 80, beta: 0.1}\n")
    cfg = load_config(str(path), check_paths=False)
    assert [(s.block, s.steps, s.beta) for s in cfg.boost.stages] == [(1, 50, 0.0), (2, 80, 0.1)]
