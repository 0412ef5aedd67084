"""Files never name code: a run's config.yaml or an artifact's metadata that names a method by import path makes
raydistill import nothing (`--resume`, `eval`) unless the user names the same method on the command line. The
module under test has a visible side effect on import: it writes a marker file."""

import json
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from helpers import make_set
from raydistill.cli import main
from raydistill.methods import registry
from raydistill.setup import config_to_dict, load_config
from raydistill.storage import artifact

MODULE = "sidefx_probe"
METHOD = f"{MODULE}:Thing"


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """An importable module whose import writes `marker`; the process's named import paths are restored after."""
    marker = tmp_path / "imported"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{MODULE}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nThing = object\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setattr(registry, "_named", set())
    sys.modules.pop(MODULE, None)  # each test imports it afresh
    yield marker
    sys.modules.pop(MODULE, None)


def run_dir_naming(tmp_path, method: str):
    run = tmp_path / "run"
    run.mkdir()
    raw = config_to_dict(load_config("quickstart", check_paths=False))
    raw.pop("ratbptt")
    raw["method"] = method
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    return run


def test_a_run_config_naming_an_import_path_imports_nothing_on_resume(tmp_path, capsys, probe):
    run = run_dir_naming(tmp_path, METHOD)
    assert main(["distill", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydistill: error: method: ") and "\n" not in err
    assert f"names '{METHOD}', an import path" in err and f"--set method={METHOD}" in err
    assert not probe.exists()


def test_restating_the_method_on_the_command_line_lets_it_be_imported(tmp_path, capsys, probe):
    run = run_dir_naming(tmp_path, METHOD)
    assert main(["distill", "--resume", str(run), "--set", f"method={METHOD}"]) == 2
    assert probe.exists()  # named by the user: imported (and then refused: not a Method)
    assert "is not a raydistill.methods.Method subclass" in capsys.readouterr().err


def test_an_artifact_naming_an_import_path_imports_nothing_on_eval(tmp_path, capsys, probe):
    run = tmp_path / "run"
    dset = make_set()
    artifact.write_distilled(run / artifact.DISTILLED_FILE, dset)
    path = run / artifact.DISTILLED_FILE
    meta = dict(dset.metadata)
    meta["config"] = {**meta["config"], "method": METHOD} if isinstance(meta.get("config"), dict) else {"method": METHOD}
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({artifact.META_KEY: json.dumps({"format_version": 1, **meta})}), path)
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "an import path" in err and f"--method {METHOD}" in err and "\n" not in err
    assert not probe.exists()


def test_a_preset_file_the_user_passes_may_name_an_import_path(tmp_path, probe):
    preset = tmp_path / "mine.yaml"
    preset.write_text(f"method: {METHOD}\n")
    with pytest.raises(Exception, match="not a raydistill.methods.Method subclass"):
        load_config(str(preset), check_paths=False)
    assert probe.exists()  # the user named it: imported


def test_registered_names_pass_the_file_check():
    registry.check_file_method("ratbptt", "a file")
    registry.check_file_method("no-such-method", "a file")  # no import path: the registry's own error says so later
