"""The memory planner: rehearsals count what the real task allocates, devices and sizes parse in one line, a plan
that does not fit names the setting that would, and the pre-launch check stops (or fixes) a run before it starts."""

import pytest
import torch

from raydistill.config import ConfigError
from raydistill.memory import LiveBytes
from raydistill.methods.rehearsal import DataShape
from raydistill.models.registry import inference_batch
from raydistill.plan import Device, gpu, parse_memory, plan, plan_data, suggest, task_estimate, with_changes
from raydistill.plan.check import prelaunch
from raydistill.plan.devices import GIB, MIB
from raydistill.plan.shapes import PlanData
from raydistill.setup import config_from_dict, validate_against_data

NC = 10


def ratbptt_config(size=28, width=16, depth=3, ipc=2, window=3, **section):
    section = {"unroll": window, "window": window, "window_mode": "end", "real_batch": 64, **section}
    return config_from_dict({"ipc": ipc, "model": {"width": width, "depth": depth, "cpu_kernels": "none"},
                             "labels": {"learn": section.pop("learn", False)}, "ratbptt": section})


def test_live_bytes_counts_views_once_and_frees_with_the_last_view():
    with LiveBytes() as m:
        a = torch.empty(100, device="meta")
        b = a.view(10, 10)
        assert m.live == 400
        del a
        assert m.live == 400
        del b
        assert m.live == 0 and m.peak == 400


def test_terms_add_up_to_the_peak_and_name_the_window():
    est = task_estimate(ratbptt_config(window=4), DataShape((3, 28, 28), NC), gpu("t4"))
    assert sum(est.terms.values()) == est.peak
    assert any(k.startswith("window activations (4 steps)") for k in est.terms)


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * GIB), ("16 GB", 16 * 10**9), ("8000MiB", 8000 * MIB),
                                           ("1.5TiB", int(1.5 * 1024 * GIB)), (1024, 1024)])
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["-5GiB", "0", "abc", "12XB", "nan", "inf GiB", ""])
def test_a_bad_memory_size_is_one_line(text):
    with pytest.raises(ConfigError, match=r"^--gpu-memory: .*(24GiB)") as info:
        parse_memory(text)
    assert "\n" not in str(info.value)


def test_an_unknown_gpu_names_the_known_ones():
    with pytest.raises(ConfigError, match="--gpu: unknown GPU 'v100'; choose one of t4, a10g"):
        gpu("v100")


def test_a_gpu_share_gets_its_share_of_the_memory():
    assert gpu("a10g").shared(0.5).memory == gpu("a10g").memory // 2
    assert gpu("a10g").shared(2.0) == gpu("a10g")


def test_known_sets_plan_without_their_data_and_others_ask_for_sizes():
    cfg = ratbptt_config()
    assert plan_data(cfg).shape == DataShape((1, 28, 28), 10)
    other = config_from_dict({"data": {"name": "imagefolder", "root": "/nonexistent"}}, check_paths=False)
    with pytest.raises(ConfigError, match="set data.classes and data.image_size"):
        plan_data(other)
    told = config_from_dict({"data": {"name": "imagefolder", "classes": 7, "image_size": 48, "train_images": 700}},
                            check_paths=False)
    assert plan_data(told).shape == DataShape((3, 48, 48), 7) and plan_data(told).train_images == 700


def test_a_loaded_set_must_have_the_classes_the_config_expects():
    cfg = config_from_dict({"data": {"classes": 7}}, check_paths=False)
    with pytest.raises(ConfigError, match="data.classes: the config expects 7 classes, the data set has 10"):
        validate_against_data(cfg, 1000, 10, 100)


def test_accuracy_passes_hold_about_as_much_as_2048_cifar_images():
    assert inference_batch((3, 32, 32)) == inference_batch((1, 28, 28)) == 2048
    assert inference_batch((3, 128, 128)) == 128 and inference_batch((3, 512, 512)) == 16


def small_plan(memory, **kwargs):
    cfg = ratbptt_config(window=6, real_batch=256, **kwargs)
    return plan(cfg, PlanData(DataShape((1, 28, 28), NC), 1000, 100, "test"), Device("test", "cpu", memory))


def test_a_plan_that_fits_suggests_nothing():
    p = small_plan(4 * GIB)
    assert p.fits is True and suggest(p) == []


def test_a_plan_that_does_not_fit_names_settings_that_fit_and_their_cost():
    base = small_plan(10 * GIB)
    tight = small_plan(int(base.worker.peak / 0.9 * 0.6))  # 60 % of what it needs
    assert tight.fits is False
    options = suggest(tight)
    assert options and options[0].same_gradient
    for option in options:
        assert option.plan.worker_fits is True
        again = plan(with_changes(tight.config, option.changes), tight.data, tight.device)
        assert again.worker.peak == option.plan.worker.peak
    assert options[0].time_factor >= 1.0


def test_prelaunch_stops_in_one_line_or_returns_the_changes_for_auto():
    tight = small_plan(10 * GIB)
    tight = small_plan(int(tight.worker.peak / 0.9 * 0.6))
    with pytest.raises(ConfigError, match=r"^memory: one gradient worker needs about .* --set ratbptt\.") as info:
        prelaunch(tight.config, tight.data, tight.device, "check")
    assert "\n" not in str(info.value) and "--fit auto" in str(info.value)
    changes, message = prelaunch(tight.config, tight.data, tight.device, "auto")
    assert changes and message.startswith("--fit auto: --set ratbptt.")
    assert prelaunch(tight.config, tight.data, tight.device, "off") == ({}, None)
    assert prelaunch(tight.config, tight.data, Device("unknown", "gpu", None), "check") == ({}, None)


def test_nothing_fits_a_machine_too_small_for_the_network():
    tiny = small_plan(1 * MIB)
    with pytest.raises(ConfigError, match="no setting of ratbptt's memory levers fits"):
        prelaunch(tiny.config, tiny.data, tiny.device, "check")


def test_a_bad_device_for_plan_is_one_line_and_exit_2(capsys):
    from raydistill.cli import main

    for args in (["--gpu", "v100"], ["--gpu-memory=-5GiB"], ["--cpu-memory", "lots"]):
        assert main(["plan", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("raydistill: error: ") and "\n" not in err


def test_a_ray_workers_memory_is_its_gpu_share_or_its_nodes_memory_per_worker(monkeypatch):
    import ray

    from raydistill.engine import memory

    cfg = config_from_dict({"ray": {"workers": 4, "gpus_per_worker": 0.5}}, check_paths=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 2.0, "accelerator_type:A10G": 2.0, "CPU": 8.0})
    device = memory.ray_worker_device(cfg)
    assert device.kind == "gpu" and device.memory == gpu("a10g").memory // 2
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 2.0, "accelerator_type:V100": 2.0})
    assert memory.ray_worker_device(cfg) is None  # a model the planner does not know: not checked
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8 * GIB}},
             {"Alive": True, "Resources": {"CPU": 4.0, "memory": 12 * GIB}}]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 6.0})
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    cpu = config_from_dict({"ray": {"workers": 4, "cpus_per_worker": 1}}, check_paths=False)
    assert memory.ray_worker_device(cpu).memory == 3 * GIB  # the 4-CPU node holds 4 workers in 12 GiB


def test_a_task_that_cannot_be_rehearsed_is_not_planned_and_not_stopped(monkeypatch):
    from raydistill.methods.ratbptt.method import RatBptt

    def no_meta_kernel(self, cfg, shape):
        raise NotImplementedError("aten::my_op: attempted to run this operator with Meta tensors\nmore")

    monkeypatch.setattr(RatBptt, "rehearse", no_meta_kernel)
    p = small_plan(1 * MIB)
    assert p.worker.peak is None and p.fits is None
    assert "could not be rehearsed on the meta device (aten::my_op" in p.worker.notes[0]
    assert prelaunch(p.config, p.data, p.device, "check") == ({}, None)
