"""The data set's shape as the planner needs it, without loading the images.

From a prepared set's manifest when data.root is readable, from the registered data sets' known sizes, and from
the config's `data.classes` / `data.train_images` where neither can tell (a prepared set on a cluster's storage).
The pre-launch check passes the loaded data set's own sizes instead (`from_dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass

from raydistill.config import ConfigError, DistillConfig
from raydistill.data.parquet import read_manifest
from raydistill.data.registry import DataError, Dataset
from raydistill.methods.rehearsal import DataShape

# name: (channels, side, classes, training images, test images) of the data sets raydistill loads by name
KNOWN = {
    "fashion-mnist": (1, 28, 10, 60000, 10000),
    "mnist": (1, 28, 10, 60000, 10000),
    "cifar10": (3, 32, 10, 50000, 10000),
    "cifar100": (3, 32, 100, 50000, 10000),
    "svhn": (3, 32, 10, 73257, 26032),
}


@dataclass(frozen=True)
class PlanData:
    shape: DataShape
    train_images: int  # before the validation split
    test_images: int
    source: str  # where the sizes come from, for the plan's reader


def from_dataset(dataset: Dataset) -> PlanData:
    shape = DataShape(tuple(dataset.image_shape), dataset.num_classes)
    return PlanData(shape, dataset.num_train + len(dataset.val_y), len(dataset.test_y), "the loaded data set")


def _manifest(cfg: DistillConfig) -> tuple[tuple[int, int, int], int, int, int] | None:
    if cfg.data.name != "parquet" or not cfg.data.root:
        return None
    try:
        _, _, manifest = read_manifest(cfg.data.root)
        shape, classes = tuple(manifest["image_shape"]), len(manifest["classes"])
        rows = {name: int(split["rows"]) for name, split in manifest["splits"].items()}
    except (DataError, OSError, KeyError, TypeError, ValueError):
        return None
    return shape, classes, rows.get("train", 0), rows.get("test", 0)


def plan_data(cfg: DistillConfig) -> PlanData:
    """The sizes of cfg's data set, from the first source that knows them; a one-line ConfigError when none does."""
    d = cfg.data
    read = _manifest(cfg)
    if read is not None:
        shape, classes, train, test = read
        return PlanData(DataShape(shape, classes), train, test, f"the manifest at {d.root}")
    if d.name in KNOWN:
        c, side, classes, train, test = KNOWN[d.name]
        side = d.image_size or side
        return PlanData(DataShape((c, side, side), d.classes or classes), d.train_images or train, test,
                        f"{d.name}'s known sizes")
    if d.classes is None or d.image_size is None:
        raise ConfigError(f"data: the planner cannot tell the classes and image size of data.name {d.name} without "
                          f"reading it; set data.classes and data.image_size (and data.train_images), or point "
                          f"data.root at a readable prepared set")
    train = d.train_images or d.classes * 1300  # an ImageNet class's training images when not told
    return PlanData(DataShape((3, d.image_size, d.image_size), d.classes), train, max(d.val_size, 1),
                    "data.classes, data.image_size and data.train_images")
