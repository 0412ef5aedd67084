"""Bad settings, outputs and crafted files end in one line and a non-zero exit, before anything is written."""

import pytest
from conftest import needs_fashion

from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.config.loading import load_config
from raydistill.config.validate import check_archs, load_checked


@pytest.mark.parametrize("override", ["meta.lr=nan", "meta.lr=.inf", "ratbptt.inner_lr=nan", "eval.lr=-.inf",
                                      "meta.ema_decay=nan", "augment.rotate_degrees=.nan", "boost.stages=[{beta: .nan}]"])
def test_every_float_setting_must_be_finite(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config("quickstart", [override], check_paths=False)


@needs_fashion
def test_a_missing_gpu_fails_before_the_run_starts(tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    assert main(["distill", "--set", "device=cuda", "--out", str(out), "--quiet"]) == 2
    assert "device: cuda asked for but no CUDA GPU is visible" in capsys.readouterr().err
    assert not out.exists()


def test_a_network_that_cannot_take_the_images_is_refused_up_front():
    cfg = load_config("quickstart", ["eval.archs=convnet,vgg11"], check_paths=False)
    check_archs(cfg, (1, 28, 28), 10)
    with pytest.raises(ConfigError, match=r"eval.archs\[1\]: vgg11 cannot take 3x8x8 images"):
        check_archs(cfg, (3, 8, 8), 10)
    with pytest.raises(ConfigError, match="model.name: convnet cannot take 1x4x4 images"):
        check_archs(cfg, (1, 4, 4), 10)


@needs_fashion
def test_load_checked_runs_the_architecture_check():
    with pytest.raises(ConfigError, match="model.name: convnet cannot take"):
        load_checked(load_config("quickstart", ["model.depth=6"]))
