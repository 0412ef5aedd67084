"""Every shipped preset for images of 64 px or more fits the cluster files' smaller GPU (the T4 of gcp-gpu.yaml, 16 GB)
by the planner's account, with its headroom, and its comment states the planned peak the planner predicts today."""

import re

import pytest

from raydistill.config.loading import PRESETS, preset_names
from raydistill.plan import HEADROOM, format_bytes, preset_plan
from raydistill.plan.presets import LARGE_IMAGE
from raydistill.setup import load_config

STATED = re.compile(r"Planned peak per worker:\s*#?\s*([0-9.]+ [GM]iB) on a T4")


def large_presets():
    out = []
    for name in preset_names():
        cfg = load_config(name, check_paths=False)
        side = cfg.data.image_size or 0
        if side >= LARGE_IMAGE:
            out.append(name)
    return out


def test_there_are_large_image_presets_to_check():
    assert {"imagenette-ipc10", "imagewoof-ipc1", "imagenet64-ipc1", "tinyimagenet-ipc10"} <= set(large_presets())


@pytest.mark.parametrize("name", large_presets())
def test_a_large_image_preset_fits_a_t4_and_says_so(name):
    p = preset_plan(load_config(name, check_paths=False))
    assert p.device.name == "t4"
    assert p.fits, f"{name}: {format_bytes(p.largest.peak)} > {format_bytes(p.budget)}"
    assert p.largest.peak <= p.device.memory * (1 - HEADROOM)
    text = (PRESETS / f"{name}.yaml").read_text().replace("\n#", "")
    stated = STATED.search(text)
    assert stated, f"{name}.yaml does not state its planned peak ('Planned peak per worker: X GiB on a T4')"
    assert stated.group(1) == format_bytes(p.worker.peak), f"{name}.yaml states {stated.group(1)}; the planner " \
        f"now predicts {format_bytes(p.worker.peak)}: update the comment"
