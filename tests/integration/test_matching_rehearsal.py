"""The matching methods' rehearsals (DM, DC, DSA, CAFE): each predicted peak against the peak of the method's real
gradient task on the CPU, measured by the same meter; the extrapolation in the classes against a rehearsal of every
class; a CIFAR-100-sized rehearsal; the terms."""

import pytest
import torch

from raydistill.data.selection import class_index
from raydistill.memory import LiveBytes
from raydistill.methods.base import IMAGES
from raydistill.methods.cafe.rehearse import task_phases as cafe_task
from raydistill.methods.dc.rehearse import task_phases as dc_task
from raydistill.methods.dm.rehearse import task_phases as dm_task
from raydistill.methods.matching import BN_IMAGES_PER_CLASS, MatchingContext, resolved_loops
from raydistill.methods.matching_rehearsal import quadratic, rehearse_classes, rehearse_matching, with_strategy
from raydistill.methods.registry import get_method
from raydistill.methods.rehearsal import DataShape, linear
from raydistill.models.registry import build_network
from raydistill.setup import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU tasks: a second thread only waits on the first

DSA_STRATEGIES = ["color", "crop", "cutout", "flip", "scale", "rotate"]


def make_cfg(method: str, ipc: int, model: dict, strategies: list[str], **section):
    return config_from_dict({"method": method, "ipc": ipc, "model": {"cpu_kernels": "none", **model},
                             "augment": {"strategies": strategies}, method: section}, check_paths=False)


def real_task(cfg, shape: DataShape):
    """The method, a context with CPU real data (`batch_real` random images per class, or 16 for DC's BatchNorm
    rule), a synthetic set and its labels."""
    nc, (c, h, w) = shape.num_classes, shape.image_shape
    rows = max(cfg.method_config.batch_real, BN_IMAGES_PER_CLASS)
    g = torch.Generator().manual_seed(0)
    real_y = torch.arange(nc).repeat_interleave(rows)
    real_x = torch.randn(len(real_y), c, h, w, generator=g)

    def factory():
        return build_network(cfg.model.name, cfg.model, shape.image_shape, nc)

    ctx = MatchingContext(cfg, real_x, real_y, class_index(real_y, nc), factory)
    images = torch.randn(nc * cfg.ipc, c, h, w, generator=g)
    return get_method(cfg.method), ctx, images, torch.arange(nc).repeat_interleave(cfg.ipc)


def real_peak(cfg, shape: DataShape) -> int:
    """The peak bytes of the method's real gradient task on the CPU, measured as the rehearsal is: the synthetic set
    and its labels held, the real data (made outside the meter) not counted, as the planner counts it apart. The
    task is that of the first step whose seeded episode trains the network (k >= 1), as the plan assumes."""
    method, ctx, images, hard = real_task(cfg, shape)
    step = 0
    if cfg.method != "dm" and resolved_loops(cfg.method_config, cfg.ipc)[0] > 1:
        while method.gradient(ctx, {IMAGES: images}, hard, step, 0, None).stats["episode"] < 1:
            step += 1
    with LiveBytes() as meter:
        meter.hold(images, hard)
        method.gradient(ctx, {IMAGES: images}, hard, step, 0, None)
        return meter.peak


EPISODE = {"outer_loop": 2, "inner_loop": 2}
CASES = {  # id: (method, ipc, model, strategies, section, image shape, classes)
    "dm-28px-none": ("dm", 2, {"width": 8, "depth": 2, "norm": "none"}, [], {"batch_real": 5}, (1, 28, 28), 3),
    "dm-32px-crop": ("dm", 3, {"width": 16, "depth": 3}, ["crop"], {"batch_real": 7}, (3, 32, 32), 10),
    "dm-32px-batchnorm": ("dm", 1, {"width": 8, "depth": 3, "norm": "batch"}, ["rotate"], {"batch_real": 6},
                          (3, 32, 32), 6),
    "dc-28px": ("dc", 2, {"width": 8, "depth": 2}, [], {"batch_real": 5}, (1, 28, 28), 3),
    "dc-32px-episode": ("dc", 3, {"width": 8, "depth": 3}, [], {"batch_real": 7, "batch_train": 4, **EPISODE},
                        (3, 32, 32), 4),
    "dc-28px-batchnorm": ("dc", 2, {"width": 8, "depth": 2, "norm": "batch"}, [],
                          {"batch_real": 20, "batch_train": 4, **EPISODE}, (1, 28, 28), 5),
    "dsa-32px-crop": ("dsa", 2, {"width": 8, "depth": 2}, ["crop"], {"batch_real": 6, "batch_train": 4, **EPISODE},
                      (3, 32, 32), 4),
    "dsa-28px-rotate": ("dsa", 3, {"width": 8, "depth": 3}, ["rotate"], {"batch_real": 8, "batch_train": 16,
                                                                          **EPISODE}, (1, 28, 28), 4),
    "dsa-32px-color-batchnorm": ("dsa", 1, {"width": 8, "depth": 2, "norm": "batch"}, ["color"],
                                 {"batch_real": 20, "batch_train": 4, **EPISODE}, (3, 32, 32), 5),
    "cafe-28px": ("cafe", 2, {"width": 8, "depth": 2}, [], {"batch_real": 5}, (1, 28, 28), 3),
    "cafe-32px-episode": ("cafe", 3, {"width": 16, "depth": 3, "norm": "batch"}, [],
                          {"batch_real": 7, "batch_train": 8, **EPISODE}, (3, 32, 32), 8),
    "cafe-28px-crop": ("cafe", 1, {"width": 8, "depth": 2}, ["crop"], {"batch_real": 20, "batch_train": 4,
                                                                        **EPISODE}, (1, 28, 28), 10),
}


def case(name: str):
    method, ipc, model, strategies, section, image_shape, classes = CASES[name]
    return make_cfg(method, ipc, model, strategies, **section), DataShape(image_shape, classes)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_rehearsed_peak_is_the_real_tasks_within_5_percent(name):
    cfg, shape = case(name)
    planned = get_method(cfg.method).rehearse(cfg, shape)
    real = real_peak(cfg, shape)
    assert planned.peak == pytest.approx(real, rel=0.05), (planned.peak, real)
    assert sum(planned.terms.values()) == planned.peak and min(planned.terms.values()) >= 0, planned.terms
    assert planned.terms["synthetic set"] == shape.num_classes * cfg.ipc * (4 * torch.Size(
        shape.image_shape).numel() + 8)


BODIES = {"dm": (dm_task, 2), "dc": (dc_task(False), 2), "dsa": (dc_task(True), 2), "cafe": (cafe_task, 3)}
WIDE = {  # many classes, so the loss over every class is extrapolated from a few
    "dm": ("dm", 2, {"width": 8, "depth": 2}, ["scale"], {"batch_real": 8}),
    "dc": ("dc", 1, {"width": 8, "depth": 2, "norm": "batch"}, [], {"batch_real": 8, "batch_train": 4, **EPISODE}),
    "dsa": ("dsa", 2, {"width": 4, "depth": 2}, ["crop"], {"batch_real": 6, "batch_train": 8, **EPISODE}),
    "cafe": ("cafe", 1, {"width": 4, "depth": 2}, [], {"batch_real": 48}),  # the discrimination term dominates
}


@pytest.mark.parametrize("method", sorted(WIDE))
def test_the_extrapolation_in_the_classes_is_a_rehearsal_of_every_class_within_2_percent(method):
    name, ipc, model, strategies, section = WIDE[method]
    cfg = make_cfg(name, ipc, model, strategies, **section)
    shape = DataShape((1, 16, 16), 8)
    body, points = BODIES[method]
    whole = rehearse_classes(cfg, shape, shape.num_classes, body).phases
    extrapolated = rehearse_matching(cfg, shape, body, points)
    assert set(extrapolated) == set(whole)
    for phase in whole:
        assert extrapolated[phase].peak == pytest.approx(whole[phase].peak, rel=0.02), phase
        assert extrapolated[phase].end == pytest.approx(whole[phase].end, rel=0.02), phase
    assert max(p.peak for p in extrapolated.values()) == pytest.approx(max(p.peak for p in whole.values()), rel=0.02)


def test_the_fits_go_through_their_points():
    assert [quadratic(5, 9, 16, n) for n in (1, 2, 3, 4)] == [5, 9, 16, 26]
    assert quadratic(3, 5, 7, 100) == linear(3, 5, 100) == 201


@pytest.mark.parametrize("method", ["dm", "dc", "dsa", "cafe"])
def test_a_cifar100_sized_task_is_rehearsed_and_explained(method):
    section = {"batch_real": 256} if method == "dm" else {"batch_real": 256, "outer_loop": 10, "inner_loop": 50}
    strategies = [] if method == "dc" else DSA_STRATEGIES
    cfg = make_cfg(method, 10, {"width": 128, "depth": 3}, strategies, **section)
    planned = get_method(method).rehearse(cfg, DataShape((3, 32, 32), 100))
    assert 1e9 < planned.peak < 1e10
    assert sum(planned.terms.values()) == planned.peak and min(planned.terms.values()) >= 0
    assert "matching graphs (100 classes)" in planned.terms
    assert any("extrapolated to 100" in note for note in planned.notes)
    if method != "dc":
        assert any("planned as crop" in note for note in planned.notes)  # the index of its gather: 2 bytes a value
    if method != "dm":
        assert any("episode" in note for note in planned.notes)


def test_several_strategies_are_planned_as_the_costliest_and_bound_the_real_task():
    strategies = ["flip", "crop", "rotate"]
    cfg = make_cfg("dsa", 2, {"width": 4, "depth": 2}, strategies, batch_real=6, batch_train=4, **EPISODE)
    shape = DataShape((1, 28, 28), 3)
    planned = get_method("dsa").rehearse(cfg, shape)
    each = {s: get_method("dsa").rehearse(with_strategy(cfg, s), shape).peak for s in strategies}
    assert planned.peak == max(each.values())
    assert real_peak(cfg, shape) <= planned.peak
