"""The memory planner against the real thing: a rehearsal counts what the real task allocates, byte for byte (up to
5 %), `raydistill plan` prints every process and what would fit, and distill's pre-launch check stops a run that
cannot fit before anything is written, or (--fit auto) applies the setting that fits."""

import pytest
import torch
from helpers import needs_fashion, write_sweep

from raydistill.config import ConfigError
from raydistill.memory import LiveBytes
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient
from raydistill.methods.rehearsal import DataShape
from raydistill.models.registry import build_network
from raydistill.plan import CPU, plan, plan_data, task_estimate
from raydistill.setup import config_from_dict
from raydistill.tune import checked_config, load_sweep

NC = 10


def ratbptt_config(size=28, width=16, depth=3, ipc=2, window=3, **section):
    section = {"unroll": window, "window": window, "window_mode": "end", "real_batch": 64, **section}
    return config_from_dict({"ipc": ipc, "model": {"width": width, "depth": depth, "cpu_kernels": "none"},
                             "labels": {"learn": section.pop("learn", False)}, "ratbptt": section})


def allocated_by_the_real_task(cfg, size):
    """The most bytes alive at once while the real meta_gradient runs on the CPU (inputs held, real data not)."""
    shape = (3, size, size)
    g = torch.Generator().manual_seed(0)
    hard = torch.arange(NC).repeat_interleave(cfg.ipc)
    images = torch.randn(len(hard), *shape, generator=g)
    soft = torch.rand(len(hard), NC, generator=g) if cfg.labels.learn else None
    r = cfg.method_config
    real = RealBatch(torch.randn(r.real_batch, *shape, generator=g), torch.randint(0, NC, (r.real_batch,), generator=g))
    with LiveBytes() as meter:
        meter.hold(*[t for t in (images, hard, soft) if t is not None])
        meta_gradient(SynSet(images, hard, soft), real, lambda: build_network("convnet", cfg.model, shape, NC), r,
                      cfg.augment, 3)
    return meter.peak


@pytest.mark.parametrize("size,kwargs", [
    (28, dict()),
    (28, dict(window=1)),
    (28, dict(window=6, window_segments=3)),
    (28, dict(window=5, window_segments=2, real_batch=256)),
    (28, dict(real_batch=256, real_batch_chunks=4)),
    (32, dict(window=4, window_segments=2, real_batch=128, real_batch_chunks=3, learn=True)),
    (32, dict(window=4, learn=True, batch_per_class=1, classes_per_step=5)),
    (32, dict(unroll=10, window=4, window_mode="random")),
])
def test_the_rehearsal_counts_what_the_real_task_allocates(size, kwargs):
    cfg = ratbptt_config(size=size, **kwargs)
    rehearsed = task_estimate(cfg, DataShape((3, size, size), NC), CPU).rehearsed
    real = allocated_by_the_real_task(cfg, size)
    assert rehearsed == pytest.approx(real, rel=0.05)


# ---------------------------------------------------------------------------------------------- the pre-launch check


def big_worker_args(out, *extra):
    return ["distill", "--in-process", "--no-eval", "--quiet", "--out", str(out), "--set", "steps=1",
            "--set", "ipc=10", "--set", "eval.every=0", *extra]


@needs_fashion
def test_distill_refuses_a_run_that_cannot_fit_before_writing_anything_and_auto_fixes_it(tmp_path, monkeypatch,
                                                                                        capsys):
    from raydistill.cli import main
    from raydistill.engine import memory
    from raydistill.setup import load_config

    cfg = load_config("quickstart", ["ipc=10", "eval.every=0"])
    worker = plan(cfg, plan_data(cfg), CPU).worker.peak
    monkeypatch.setattr(memory, "machine_memory", lambda: int(worker * 0.75))  # 0.675 of the need, with headroom
    out = tmp_path / "run"
    assert main(big_worker_args(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydistill: error: memory: one gradient worker needs about") and "\n" not in err
    assert "--fit auto" in err and "--set ratbptt." in err
    assert not out.exists()  # nothing written

    assert main(big_worker_args(out, "--fit", "auto")) == 0
    said = capsys.readouterr().out
    assert "raydistill: --fit auto: --set ratbptt." in said
    changed = load_config(str(out / "config.yaml"))
    assert (changed.method_config.window_segments, changed.method_config.real_batch_chunks) != (1, 1)
    assert main(big_worker_args(tmp_path / "unchecked", "--fit", "off")) == 0


def test_plan_prints_every_process_and_whether_it_fits(capsys):
    from raydistill.cli import main

    assert main(["plan", "--gpu", "t4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: quickstart on t4")
    for role in ("gradient worker", "evaluation task", "parameter server", "window activations (15 steps)"):
        assert role in out
    assert out.rstrip().endswith("fits.")


def test_plan_names_what_would_fit_and_exits_1_when_nothing_does_yet(capsys):
    from raydistill.cli import main

    assert main(["plan", "--set", "ipc=10", "--gpu-memory", "1.5GiB"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "Settings that would" in out and "--set ratbptt." in out


@needs_fashion
def test_a_sample_that_cannot_fit_a_worker_is_rejected_with_the_setting_that_would(tmp_path, monkeypatch):
    from raydistill.engine import memory
    from raydistill.plan import Device

    sweep = load_sweep(write_sweep(tmp_path, search={"ratbptt.window": {"grid": [2, 4]}}))
    cfg, _ = checked_config(sweep, {"ratbptt.window": 4})
    tight = 0.7 * tune_plan_peak(cfg)
    monkeypatch.setattr(memory, "ray_worker_device", lambda cfg: Device("a small worker", "cpu", int(tight)))
    with pytest.raises(ConfigError, match=r"^memory: one gradient worker needs about .* --set ratbptt\."):
        checked_config(sweep, {"ratbptt.window": 4})


def tune_plan_peak(cfg) -> int:
    from raydistill.plan import CPU, plan, plan_data

    return plan(cfg, plan_data(cfg), CPU).worker.peak
