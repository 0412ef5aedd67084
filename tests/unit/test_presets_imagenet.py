"""The ImageNet-shaped presets: ImageNette / ImageWoof at 128 px on ConvNet-5 (MTT's setting) and ImageNet-1K at
64 px on ConvNet-4, all reading a set written by `raydistill prepare`."""

import pytest
import torch

from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.config.loading import PRESETS
from raydistill.models.registry import create_model
from raydistill.setup import check_archs, load_config

SUBSETS = {f"{name}-ipc{ipc}": (name, ipc) for name in ("imagenette", "imagewoof") for ipc in (1, 10)}


@pytest.mark.parametrize("preset", sorted(SUBSETS))
def test_subset_presets_are_mtts_convnet5_at_128_px_on_prepared_parquet(preset):
    name, ipc = SUBSETS[preset]
    cfg = load_config(preset, check_paths=False)
    assert (cfg.ipc, cfg.data.name, cfg.data.image_size, cfg.data.root) == (ipc, "parquet", 128, None)
    assert (cfg.model.name, cfg.model.depth, cfg.model.width, cfg.model.norm) == ("convnet", 5, 128, "instance")
    r = cfg.method_config
    assert (r.unroll, r.window, r.window_mode) == (200, 60, "random")
    assert r.batch_per_class == ipc and r.classes_per_step == 10
    assert 0 < cfg.data.val_size <= 1000  # ImageNette has ~1.3k training images a class: keep most of them
    header = (PRESETS / f"{preset}.yaml").read_text()  # says how to make the set it needs
    assert "raydistill prepare" in header and f"--classes {name}" in header and "--image-size 128" in header


def test_imagewoof_presets_differ_from_imagenette_only_in_their_comment_and_training_size():
    for ipc in (1, 10):
        woof, nette = (load_config(f"{name}-ipc{ipc}", check_paths=False) for name in ("imagewoof", "imagenette"))
        assert (woof.data.train_images, nette.data.train_images) == (9025, 9469)
        woof.data.train_images = nette.data.train_images
        assert woof == nette


def test_imagenet64_preset_reads_a_prepared_64px_set_with_convnet4():
    cfg = load_config("imagenet64-ipc1", check_paths=False)
    assert (cfg.data.name, cfg.data.image_size, cfg.model.depth) == ("parquet", 64, 4)
    r = cfg.method_config
    assert (r.unroll, r.window, r.window_mode, r.fixed_start, r.classes_per_step) == (280, 80, "fixed", 200, 50)
    assert cfg.labels.learn


@pytest.mark.parametrize("preset,shape,classes", [("imagenette-ipc1", (3, 128, 128), 10),
                                                  ("imagewoof-ipc10", (3, 128, 128), 10),
                                                  ("imagenet64-ipc1", (3, 64, 64), 1000)])
def test_the_presets_network_takes_their_images(preset, shape, classes):
    cfg = load_config(preset, check_paths=False)
    check_archs(cfg, shape, classes)  # raises ConfigError when the network cannot take the images
    net = create_model("convnet", 3, classes, shape[1], width=8, depth=cfg.model.depth, norm="instance")
    assert net(torch.zeros(2, *shape)).shape == (2, classes)
    with pytest.raises(ConfigError):  # three levels deeper pools the images below one pixel: the check bites
        check_archs(load_config(preset, [f"model.depth={cfg.model.depth + 3}"], check_paths=False), shape, classes)


@pytest.mark.parametrize("preset", [*sorted(SUBSETS), "imagenet64-ipc1"])
def test_without_data_root_the_cli_says_so_in_one_line(preset, capsys):
    assert main(["distill", "--preset", preset, "--no-eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.root" in err, err
