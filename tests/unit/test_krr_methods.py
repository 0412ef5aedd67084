"""FRePo, RFAD and KIP: the shared closed form against torch.linalg.solve, each task's gradients (images, learned
labels, Platt temperature) against float64 central differences, the kernels against hand-written references, the
seeded pool, a few updates lowering each loss on Fashion-MNIST, and the bad values (in one process, no Ray)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import needs_fashion

from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.data.registry import load_dataset
from raydistill.engine.worker import method_resources
from raydistill.methods.base import IMAGES, SOFT_LABELS, WorkerResources
from raydistill.methods.krr.common import PLATT
from raydistill.methods.krr.config import FrepoConfig, KipConfig, RfadConfig
from raydistill.methods.krr.frepo import member_age
from raydistill.methods.krr.kip import jacobians, output_directions
from raydistill.methods.krr.rfad import nngp_init_
from raydistill.methods.krr.solver import SingularKernelError, centred_targets, krr_predict
from raydistill.methods.registry import get_method, method_names
from raydistill.models.registry import create_model
from raydistill.setup import config_from_dict
from raydistill.synset.synthetic import init_synthetic

METHODS = ("frepo", "rfad", "kip")
CLASSES, IPC, SIDE, REAL = 3, 2, 8, 12


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return a @ a.T


# ---------------------------------------------------------------------------------------------- the closed form


def test_the_closed_form_matches_a_direct_solve_with_the_trace_scaled_regulariser():
    k_ss, g = spd(6), torch.Generator().manual_seed(1)
    k_ts = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64)
    reg = 1e-3
    want = k_ts @ torch.linalg.solve(k_ss + reg * torch.trace(k_ss) / 6 * torch.eye(6, dtype=torch.float64), y)
    assert torch.allclose(krr_predict(k_ss, k_ts, y, reg), want, rtol=1e-10, atol=1e-12)
    # relative regulariser: scaling the kernel leaves the predictions alone
    assert torch.allclose(krr_predict(7.0 * k_ss, 7.0 * k_ts, y, reg), want, rtol=1e-9, atol=1e-12)
    # float32 kernels solved in float64 come back in float32, close to the float64 answer
    got32 = krr_predict(k_ss.float(), k_ts.float(), y.float(), reg, float64=True)
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), want, rtol=1e-4, atol=1e-4)


def test_the_closed_form_is_differentiable_against_central_differences():
    k_half = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    k_ts = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)

    def loss(f, labels):
        return krr_predict(f @ f.T, k_ts, labels, 1e-2).pow(2).sum()

    f = k_half.clone().requires_grad_(True)
    gf, gy = torch.autograd.grad(loss(f, y), (f, y))
    eps = 1e-6
    for i, j in [(0, 0), (2, 5), (4, 7)]:
        bump = torch.zeros_like(k_half)
        bump[i, j] = eps
        numeric = (loss(k_half + bump, y) - loss(k_half - bump, y)) / (2 * eps)
        assert float(numeric.detach()) == pytest.approx(float(gf[i, j]), rel=1e-6)
    for i, j in [(0, 1), (3, 0)]:
        bump = torch.zeros_like(y)
        bump[i, j] = eps
        numeric = (loss(k_half, y.detach() + bump) - loss(k_half, y.detach() - bump)) / (2 * eps)
        assert float(numeric) == pytest.approx(float(gy[i, j]), rel=1e-6)


@pytest.mark.parametrize("k_ss", [torch.zeros(4, 4), torch.full((4, 4), float("nan")), -torch.eye(4)],
                         ids=["all-zero", "nan", "negative"])
def test_a_kernel_singular_even_with_the_regulariser_is_one_clear_error(k_ss):
    with pytest.raises(SingularKernelError, match=r"singular even with the regulariser 1e-06 .* raise the method's reg"):
        krr_predict(k_ss.double(), torch.ones(2, 4, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64), 1e-6)


def test_centred_targets_are_frepos():
    t = centred_targets(F.one_hot(torch.tensor([1]), 10).double(), 10)
    assert torch.allclose(t, torch.tensor([[-0.1, 0.9] + [-0.1] * 8], dtype=torch.float64))
    assert torch.allclose(centred_targets(torch.ones(1, 40), 40), torch.full((1, 40), (1 - 1 / 40) / 2))


# ---------------------------------------------------------------------------------------------- tasks


def factory():
    return create_model("convnet", 1, CLASSES, SIDE, width=4, depth=2, norm="none").double()


def problem(method: str, learn: bool = True, **section):
    section.setdefault("batch_real", REAL)
    if method == "frepo":
        section.setdefault("max_online_steps", 1)  # age 0: the member does not depend on the images
    cfg = config_from_dict({"method": method, "ipc": IPC, "labels": {"learn": learn}, "augment": {"strategies": []},
                            "model": {"width": 4, "depth": 2, "norm": "none"}, method: section}, check_paths=False)
    g = torch.Generator().manual_seed(0)
    real_x = torch.randn(2 * REAL, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    real_y = torch.arange(2 * REAL) % CLASSES
    m = get_method(method)
    ctx = m.setup(cfg, WorkerResources(torch.device("cpu"), CLASSES, (1, SIDE, SIDE), real_x, real_y, factory))
    hard = torch.arange(CLASSES).repeat_interleave(IPC)
    learnables = {IMAGES: torch.randn(CLASSES * IPC, 1, SIDE, SIDE, generator=g, dtype=torch.float64)}
    if learn:
        learnables[SOFT_LABELS] = F.one_hot(hard, CLASSES).double() + 0.1 * torch.rand(len(hard), CLASSES,
                                                                                       generator=g).double()
    learnables.update({k: v.double() + 0.3 for k, v in m.init_extra(cfg, CLASSES).items()})
    return m, ctx, learnables, hard


@pytest.mark.parametrize("method,loss", [("frepo", "mse"), ("rfad", "platt"), ("rfad", "mse"), ("kip", "mse")])
def test_every_task_gradient_is_the_derivative_of_the_task_loss(method, loss):
    """float64 central differences of the task's own loss (same seed: same networks, target batch) with respect to
    the images, the learned labels and, with the platt loss, the temperature."""
    m, ctx, learnables, hard = problem(method, loss=loss)
    result = m.gradient(ctx, learnables, hard, 3, 1, None)
    assert set(result.grads) == set(learnables) == {IMAGES, SOFT_LABELS} | ({PLATT} if loss == "platt" else set())
    eps, g = 1e-6, torch.Generator().manual_seed(5)
    for name, value in learnables.items():
        grad = result.grads[name]
        assert grad.shape == value.shape and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0, name
        for flat in torch.randperm(value.numel(), generator=g)[:4].tolist():
            bump = torch.zeros(value.numel(), dtype=value.dtype)
            bump[flat] = eps
            plus, minus = dict(learnables), dict(learnables)
            plus[name], minus[name] = value + bump.view_as(value), value - bump.view_as(value)
            numeric = (m.gradient(ctx, plus, hard, 3, 1, None).loss - m.gradient(ctx, minus, hard, 3, 1, None).loss)
            assert numeric / (2 * eps) == pytest.approx(float(grad.flatten()[flat]), rel=1e-5, abs=1e-9), (name, flat)


@pytest.mark.parametrize("method", METHODS)
def test_a_task_is_a_pure_function_of_step_and_slot(method):
    m, ctx, learnables, hard = problem(method, learn=False)
    a, b = (m.gradient(ctx, learnables, hard, 5, 0, None) for _ in range(2))
    assert torch.equal(a.grads[IMAGES], b.grads[IMAGES]) and a.loss == b.loss
    c = m.gradient(ctx, learnables, hard, 5, 1, None)
    assert not torch.equal(a.grads[IMAGES], c.grads[IMAGES])  # another slot: other networks and target batch


def test_frepo_pool_members_stay_staggered_and_are_reset_when_they_age_out():
    section = FrepoConfig(pool_size=4, max_online_steps=8)
    ages = [member_age(section, m, 0)[0] for m in range(4)]
    assert ages == [0, 2, 4, 6]  # spread across the age range, as in a steady-state pool
    history = [member_age(section, 1, s) for s in range(20)]
    assert [a for a, _ in history[:8]] == [2, 3, 4, 5, 6, 7, 0, 1] and history[6][1] == history[5][1] + 1
    m, ctx, learnables, hard = problem("frepo", learn=False, pool_size=3, max_online_steps=4)
    stats = [m.gradient(ctx, learnables, hard, step, 0, None).stats for step in range(8)]
    assert {s["member"] for s in stats} <= {0, 1, 2} and len({s["age"] for s in stats}) > 1
    for s, step in zip(stats, range(8)):
        assert s["age"] == member_age(ctx.cfg.method_config, s["member"], step)[0]


def test_kip_kernel_is_the_empirical_ntk_traced_over_outputs():
    model = factory().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 1, SIDE, SIDE, dtype=torch.float64)
    jac = jacobians(model, params, x, None)
    rows = []
    for i in range(3):  # the reference: autograd per image and output
        out = model(x[i:i + 1])[0]
        rows.append(torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(out[o], list(model.parameters()),
                                                                                      retain_graph=True)])
                                 for o in range(CLASSES)]))
    assert torch.allclose(jac, torch.stack(rows), rtol=1e-10, atol=1e-12)
    d = output_directions(CLASSES, 2, torch.Generator().manual_seed(0))
    assert d.shape == (2, CLASSES) and torch.allclose(d @ d.T, torch.eye(2, dtype=d.dtype), atol=1e-12)
    assert output_directions(CLASSES, 0, torch.Generator()) is None
    assert torch.allclose(jacobians(model, params, x, d), torch.einsum("ko,nop->nkp", d, jac), atol=1e-12)


def test_rfad_draws_networks_in_the_nngp_parameterisation():
    model = create_model("convnet", 1, CLASSES, 32, width=256, depth=3, norm="none")
    nngp_init_(model, torch.Generator().manual_seed(0))
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)
    assert float(conv.bias.detach().std()) == pytest.approx(0.1, rel=0.2)


@needs_fashion
@pytest.mark.parametrize("method,lr", [("frepo", 0.003), ("rfad", 0.03), ("kip", 0.01)])
def test_a_few_adam_updates_lower_the_method_loss_on_fashion_mnist(method, lr):
    section = {"batch_real": 128} | ({"max_online_steps": 4} if method == "frepo" else {})
    cfg = config_from_dict({"method": method, "ipc": 1, "model": {"width": 8, "norm": "none"},
                            "init": {"mode": "real"}, "data": {"val_size": 200}, method: section})
    dataset = load_dataset(cfg.data)
    m = get_method(method)
    ctx = m.setup(cfg, method_resources(cfg, dataset, m.needs, torch.device("cpu")))
    learnables = dict(init_synthetic(cfg, dataset, m).learnables)
    hard = torch.arange(10)
    step = 2  # one fixed task: the same networks and target batch every time
    before = m.gradient(ctx, learnables, hard, step, 0, None).loss
    params = {k: v.clone().requires_grad_(True) for k, v in learnables.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    for _ in range(5):
        grads = m.gradient(ctx, {k: v.detach() for k, v in params.items()}, hard, step, 0, None).grads
        for k, v in params.items():
            v.grad = grads[k]
        opt.step()
    after = m.gradient(ctx, {k: v.detach() for k, v in params.items()}, hard, step, 0, None).loss
    assert after < 0.95 * before


# ---------------------------------------------------------------------------------------------- config


def test_the_krr_methods_are_registered():
    assert set(METHODS) <= set(method_names())


SECTIONS = {"frepo": FrepoConfig, "rfad": RfadConfig, "kip": KipConfig}
BAD_BY_TYPE = {"float": [0, -1e-6, ".nan"], "int": [0], "bool": ["maybe"], "str": ["hinge"]}  # annotations as text
BAD_VALUES = [(f"{m}.{f.name}={v}", f"{m}.{f.name}") for m, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              for v in ([-1] if f.name == "output_projections" else BAD_BY_TYPE[f.type])]


def test_every_krr_setting_has_bad_value_cases_lambda_nan_and_an_empty_pool_among_them():
    cases = {override for override, _ in BAD_VALUES}
    assert {f"{m}.{f.name}" for m, cls in SECTIONS.items() for f in dataclasses.fields(cls)} == {
        field for _, field in BAD_VALUES}
    assert {"frepo.reg=0", "rfad.reg=-1e-06", "kip.reg=.nan", "frepo.pool_size=0", "rfad.models=0",
            "kip.models=0"} <= cases


@pytest.mark.parametrize("override,field", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_krr_setting_is_one_line_naming_the_field(override, field):
    method = override.split(".")[0]
    with pytest.raises(ConfigError, match=f"^{field}: ") as err:
        config_from_dict({"method": method, method: {override.split(".", 1)[1].split("=")[0]:
                                                     _value(override.split("=", 1)[1])}}, check_paths=False)
    assert "\n" not in str(err.value)


def _value(text: str):
    return yaml.safe_load(text)


def test_kip_refuses_batch_norm_and_the_cli_exits_2_without_writing(tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.norm: kip takes per-image Jacobians"):
        config_from_dict({"method": "kip", "model": {"norm": "batch"}}, check_paths=False)
    out, preset = tmp_path / "run", tmp_path / "frepo.yaml"
    preset.write_text("method: frepo\nipc: 1\nfrepo: {reg: 1.0e-6}\n")
    assert main(["distill", "--preset", str(preset), "--set", "frepo.reg=0", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "frepo.reg" in err[0] and not out.exists()
