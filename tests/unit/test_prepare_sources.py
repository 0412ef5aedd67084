"""What `raydistill prepare` reads besides images: the shipped class lists (ImageNet subsets by wnid), and a built-in
set resized channel by channel like a folder image."""

import re

import numpy as np
import pytest
from PIL import Image

from helpers import one_line
from raydistill.config import ConfigError
from raydistill.data.sources import (SUBSETS_DIR, fit_square, read_class_list, resize_images, select_classes,
                                     subset_names)


# ---------------------------------------------------------------------------------------------- class lists


@pytest.mark.parametrize("name", ["imagenette", "imagewoof", "imagefruit", "imageyellow", "imagemeow", "imagesquawk",
                                  "imagenet100"])
def test_shipped_subsets_are_sourced_lists_of_wnids(name):
    assert name in subset_names()
    text = (SUBSETS_DIR / f"{name}.txt").read_text()
    assert re.search(r"^# source: \S", text, re.M)
    wnids = read_class_list(SUBSETS_DIR / f"{name}.txt")
    assert len(wnids) == (100 if name == "imagenet100" else 10) and len(set(wnids)) == len(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    everything = sorted(wnids + ["n99999999"])
    assert select_classes(name, everything) == wnids  # a shipped name resolves, in the list's order


def test_known_wnids_of_the_mtt_subsets():
    assert read_class_list(SUBSETS_DIR / "imagenette.txt")[0] == "n01440764"  # tench, ImageNet class 0
    assert "n03888257" in read_class_list(SUBSETS_DIR / "imagenette.txt")  # parachute
    assert read_class_list(SUBSETS_DIR / "imagemeow.txt")[0] == "n02123045"  # tabby


def test_a_subset_naming_missing_classes_is_a_one_line_error():
    with pytest.raises(ConfigError, match="10 classes the source does not have") as exc:
        select_classes("imagenette", ["n00000001"])
    one_line(exc)


# ---------------------------------------------------------------------------------------------- a built-in set


def test_a_built_in_set_is_resized_channel_by_channel_like_a_folder_image():
    images = np.random.default_rng(1).integers(0, 256, (3, 2, 28, 28), dtype=np.uint8)
    out = resize_images(images, 12)
    assert out.shape == (3, 2, 12, 12) and out.dtype == np.uint8
    expected = Image.fromarray(images[1, 0]).resize((12, 12), Image.Resampling.BILINEAR)
    assert np.array_equal(out[1, 0], np.asarray(expected))
    assert resize_images(images, 28) is images and resize_images(images, None) is images
    assert fit_square(Image.new("L", (40, 30)), None).size == (40, 30)
