"""Bad configuration is caught before anything runs, with one line naming the field and the fix (exit code 2)."""

import subprocess
import sys

import pytest

from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.setup import config_from_dict, config_to_dict, load_config
from raydistill.config.loading import preset_names
from raydistill.methods.ratbptt.config import RatBpttConfig

FASHION = "/usr/share/datasets/fashion-mnist"

BAD_OVERRIDES = [
    (["ratbptt.window=50", "ratbptt.unroll=40"], "ratbptt.window"),
    (["ratbptt.window=0"], "ratbptt.window"),
    (["ratbptt.unroll=-3"], "ratbptt.unroll"),
    (["ipc=0"], "ipc"),
    (["data.name=imagenet-22k"], "data.name"),
    (["model.name=transformer"], "model.name"),
    (["ratbptt.window_mode=sideways"], "ratbptt.window_mode"),
    (["ratbptt.inner_optimizer=lbfgs"], "ratbptt.inner_optimizer"),
    (["data.root=/nonexistent/fmnist"], "data.root"),
    (["meta.lr=0"], "meta.lr"),
    (["ratbptt.inner_lr=-1e-3"], "ratbptt.inner_lr"),
    (["eval.lr=0"], "eval.lr"),
    (["ratbptt.window_mode=fixed", "ratbptt.fixed_start=30", "ratbptt.window=15", "ratbptt.unroll=40"],
     "ratbptt.fixed_start"),
    (["ratbptt.windw=10"], "ratbptt.windw"),  # a typo is never silently ignored
    (["ratbptt.window=ten"], "ratbptt.window"),
    (["labels.learn=maybe"], "labels.learn"),
    (["eval.archs=[convnet, mlp9]"], "eval.archs[1]"),
    (["augment.strategies=[flip, mixup]"], "augment.strategies[1]"),
    (["augment.crop_pad=0.75"], "augment.crop_pad"),
    (["meta.optimizer=lion"], "meta.optimizer"),
    (["meta.optimizer=sgd", "meta.momentum=1.0"], "meta.momentum"),
    (["model.norm=layer"], "model.norm"),
    (["device=tpu"], "device"),
]


@pytest.mark.parametrize("overrides,field", BAD_OVERRIDES, ids=[o[1] + ":" + o[0][-1] for o in BAD_OVERRIDES])
def test_bad_value_is_one_line_naming_the_field_and_exits_2(overrides, field, tmp_path, capsys):
    args = ["distill", "--preset", "quickstart", "--out", str(tmp_path / "run")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"raydistill: error: {field}")
    assert not (tmp_path / "run").exists()  # nothing was started


def test_unknown_yaml_key_in_a_file(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("ipc: 2\nratbptt:\n  window: 10\n  unrol: 20\n")
    assert main(["distill", "--preset", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "ratbptt.unrol: unknown field" in capsys.readouterr().err


def test_malformed_yaml_and_missing_preset(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("ipc: [1,\n")
    assert main(["distill", "--preset", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["distill", "--preset", "no-such-preset"]) == 2
    assert "raydistill presets" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("os").path.isdir(FASHION), reason="needs dataset-fashion-mnist")
def test_real_batch_larger_than_training_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--set", "ratbptt.real_batch=58000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ratbptt.real_batch: 58000 is larger than the training split (55000 images)" in err
    assert not out.exists()


def test_exit_code_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raydistill.cli", "distill", "--set", "ipc=-1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "raydistill: error: ipc: must be a finite number > 0, got -1"


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_loads(name):
    cfg = load_config(name, check_paths=False)
    if cfg.method == "ratbptt":
        assert cfg.method_config.window <= cfg.method_config.unroll


def test_reference_presets_match_the_paper_table():
    c10 = load_config("cifar10-ipc10", check_paths=False)
    assert (c10.method_config.unroll, c10.method_config.window, c10.data.zca, c10.labels.learn) == (200, 60, True, False)
    c100 = load_config("cifar100-ipc1", check_paths=False)
    assert (c100.method_config.window_mode, c100.method_config.fixed_start, c100.meta.lr) == ("fixed", 40, 3e-4)
    tiny = load_config("tinyimagenet-ipc10", check_paths=False)
    assert (tiny.model.depth, tiny.method_config.real_batch, tiny.labels.learn) == (4, 1000, True)


def test_config_round_trips_through_a_dict():
    cfg = load_config("quickstart", ["ratbptt.window=7", "eval.archs=convnet,vgg11"], check_paths=False)
    again = config_from_dict(config_to_dict(cfg), check_paths=False)
    assert again == cfg and again.eval.archs == ["convnet", "vgg11"]
    assert isinstance(again.meta.lr, float)


def test_defaults_are_valid_and_ints_widen_to_floats():
    cfg = config_from_dict({"meta": {"lr": 1}}, check_paths=False)
    assert cfg.meta.lr == 1.0 and isinstance(cfg.meta.lr, float)
    assert isinstance(RatBpttConfig().window, int)
    with pytest.raises(ConfigError, match="expected int"):
        config_from_dict({"ipc": 1.5}, check_paths=False)
