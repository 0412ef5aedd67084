"""Bad input that used to end in a traceback, a runaway allocation or a silent no-op: one line each now."""

import pytest

from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.config.loading import load_yaml
from raydistill.setup import load_config

BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b]\n'


@pytest.mark.parametrize("text,problem", [
    (BOMB, "uses the YAML alias *a; write the values out"),
    ("a: &x 1\nb: *x\n", "uses the YAML alias *x"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to be a config"),
    ("x: " + "y" * (2 << 20), "more than any config"),
    ("a: [1,\n", "not valid YAML"),
])
def test_yaml_that_could_exhaust_the_machine_is_one_line(text, problem):
    with pytest.raises(ConfigError, match=problem.replace("*", r"\*")) as info:
        load_yaml(text, "f.yaml")
    assert "\n" not in str(info.value)


def test_a_preset_file_with_an_alias_is_refused_by_the_cli_before_anything_starts(tmp_path, capsys):
    preset = tmp_path / "bomb.yaml"
    preset.write_text(BOMB)
    out = tmp_path / "never"
    assert main(["distill", "--preset", str(preset), "--out", str(out), "--in-process"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydistill: error: ") and "alias" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("method,problem", [
    (":", "is not an import path; write it as package.module:Class"),
    ("raydistill.methods.base:Method", "does not declare name and config_cls"),
])
def test_a_method_that_is_not_one_is_one_line(capsys, method, problem):
    assert main(["plan", "--set", f"method={method}"]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and "\n" not in err and "Traceback" not in err


def test_cafe_with_every_loss_weight_zero_is_refused():
    zero = ["cafe.embedding_weight=0", "cafe.discrimination_weight=0", "cafe.layer_weights=[0,0,0]"]
    with pytest.raises(ConfigError, match="cafe: every loss weight is 0"):
        load_config("cafe-fashion-mnist-ipc1", zero, check_paths=False)
    load_config("cafe-fashion-mnist-ipc1", zero[:2], check_paths=False)  # the layers still weigh: a loss
