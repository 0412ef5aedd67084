"""`ratbptt.compile_prefix`: the prefix's steps through torch.compile give the eager meta-gradient (float64), every
prefix step and no window step takes the compiled path, later samples reuse the compiled code, and a failed
compilation says what to do."""

from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import AUG, convnet, make_problem, relative_error

import raydistill.methods.ratbptt.compiled as compiled
from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.methods.ratbptt.config import RatBpttConfig, validate_section
from raydistill.methods.ratbptt.meta_gradient import RealBatch, SynSet, meta_gradient

CFG = RatBpttConfig(unroll=9, window=3, inner_lr=0.01, real_batch=16, batch_per_class=1, classes_per_step=2)


def test_the_compiled_prefix_gives_the_eager_gradient_and_compiles_once():
    images, hard, soft, real_x, real_y = make_problem()
    compiled._COMPILED.clear()
    on = replace(CFG, compile_prefix=True)
    graphs, starts = [], []
    for seed in (3, 4, 5):
        eager = meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), convnet, CFG, AUG, seed)
        calls = sum(c.calls for c in compiled._COMPILED.values())
        fast = meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), convnet, on, AUG, seed)
        assert (fast.start, fast.window) == (eager.start, eager.window)
        assert len(compiled._COMPILED) == 1
        assert sum(c.calls for c in compiled._COMPILED.values()) - calls == fast.start  # the prefix, not the window
        assert torch.isfinite(fast.images).all() and eager.images.abs().max() > 0
        assert relative_error(fast.images, eager.images) < 1e-9
        assert relative_error(fast.labels, eager.labels) < 1e-9
        assert fast.meta_loss == pytest.approx(eager.meta_loss, rel=1e-9)
        graphs.append(counters["stats"]["unique_graphs"])
        starts.append(fast.start)
    assert len(set(starts)) > 1 and min(starts) > 0  # windows at different starts, each after a compiled prefix
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0]  # fresh networks, no recompilation


def test_a_failed_compilation_names_the_option_and_the_fix(monkeypatch):
    images, hard, soft, real_x, real_y = make_problem()
    on = replace(CFG, compile_prefix=True, window_mode="fixed", fixed_start=2)
    built = []

    def no_compiler(fn, **kwargs):
        built.append(fn)

        def fail(*args):
            raise OSError("cc: command not found\nsecond line")
        return fail

    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(compiled.torch, "compile", no_compiler)
    with pytest.raises(RuntimeError, match=r"^ratbptt.compile_prefix: torch.compile failed \(OSError: cc: command "
                       r"not found\); install a C\+\+ compiler \(CPU\) or Triton \(GPU\), or set "
                       r"ratbptt.compile_prefix: false$"):
        meta_gradient(SynSet(images, hard, soft), RealBatch(real_x, real_y), convnet, on, AUG, 3)
    assert len(built) == 1


def test_the_convolution_layout_gets_its_own_compiled_loss(monkeypatch):
    monkeypatch.setattr(compiled, "_COMPILED", {})
    net = convnet()
    named = list(net.named_parameters())
    args = ([n for n, _ in named], [p.shape for _, p in named], [p.numel() for _, p in named])
    nchw, nhwc = compiled.compiled_loss(net, *args, False), compiled.compiled_loss(net, *args, True)
    assert nchw is not nhwc and compiled.compiled_loss(convnet(), *args, False) is nchw


@pytest.mark.parametrize("change, needle", [
    ({"compile_prefix": "yes"}, "must be true or false"),
    ({"compile_prefix": True, "samples_per_task": 2}, "compile_prefix"),
])
def test_compile_prefix_config_errors(change, needle):
    with pytest.raises(ConfigError, match="ratbptt") as err:
        validate_section(replace(RatBpttConfig(unroll=10, window=4), **change))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_compile_prefix_rejects_batch_norm_when_the_config_loads():
    with pytest.raises(ConfigError, match="compile_prefix: does not combine with model.norm batch"):
        load_config("quickstart", ["ratbptt.compile_prefix=true", "model.norm=batch"], check_paths=False)
    load_config("quickstart", ["ratbptt.compile_prefix=true"], check_paths=False)
