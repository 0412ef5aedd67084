"""Bad settings, outputs and crafted files end in one line and a non-zero exit, before anything is written."""

import pytest
from helpers import REPO, needs_fashion

from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.setup import check_archs, load_checked


@pytest.mark.parametrize("override", ["meta.lr=nan", "meta.lr=.inf", "ratbptt.inner_lr=nan", "eval.lr=-.inf",
                                      "meta.ema_decay=nan", "augment.rotate_degrees=.nan", "boost.stages=[{beta: .nan}]"])
def test_every_float_setting_must_be_finite(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config("quickstart", [override], check_paths=False)


@needs_fashion
def test_a_missing_gpu_fails_before_the_run_starts(tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    assert main(["distill", "--set", "device=cuda", "--out", str(out), "--quiet"]) == 2
    assert "device: cuda asked for but no CUDA GPU is visible" in capsys.readouterr().err
    assert not out.exists()


def test_a_network_that_cannot_take_the_images_is_refused_up_front():
    cfg = load_config("quickstart", ["eval.archs=convnet,vgg11"], check_paths=False)
    check_archs(cfg, (1, 28, 28), 10)
    with pytest.raises(ConfigError, match=r"eval.archs\[1\]: vgg11 cannot take 3x8x8 images"):
        check_archs(cfg, (3, 8, 8), 10)
    with pytest.raises(ConfigError, match="model.name: convnet cannot take 1x4x4 images"):
        check_archs(cfg, (1, 4, 4), 10)


@needs_fashion
def test_load_checked_runs_the_architecture_check():
    with pytest.raises(ConfigError, match="model.name: convnet cannot take"):
        load_checked(load_config("quickstart", ["model.depth=6"]))


# ---------------------------------------------------------------------------------------------- crafted artifacts

import json  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from helpers import make_set  # noqa: E402

from raydistill.storage import artifact  # noqa: E402

# Bad values for every metadata key raydistill reads. A key written by raydistill that is neither here nor in
# FREE_FORM fails test_every_metadata_key_has_bad_value_cases: a new field gets its crafted cases with it.
BAD_VALUES = {
    "image_shape": [None, [784, 1, 1], [True, 28, 28], [1, 28], [1, 0, 28], [1, 28, 1e400], "1x28x28"],
    "num_classes": [None, 1e400, 0, -3, True, "10", 10**12],
    "class_names": [None, "abc", [1, 2, 3, 4], ["a"]],
    "ipc": [0, -1, 1.5, True, None],
    "normalisation": [None, {}, {"mean": [0.5] * 3}, {"mean": [0.5] * 3, "std": [0.0] * 3},
                      {"mean": [float("nan")] * 3, "std": [1.0] * 3}, {"mean": [0.5], "std": [1.0]}],
    "zca": ["yes", 1, None],
    "config": [None, [], "ratbptt"],
    "method": [None, 3, {}],
    "dataset": [None, 5],
    "learned": [[], "x"],
}
FREE_FORM = {"eval_recipe", "code_version"}  # shown or stored as they are, never used in a computation


def craft(tmp_path, meta: dict | bytes):
    run = tmp_path / "run"
    dset = make_set()
    artifact.write_distilled(run / artifact.DISTILLED_FILE, dset)
    path = run / artifact.DISTILLED_FILE
    table = pq.read_table(path)
    raw = meta if isinstance(meta, bytes) else json.dumps({"format_version": 1, **meta}).encode()
    pq.write_table(table.replace_schema_metadata({artifact.META_KEY: raw}), path)
    return run


def good_metadata() -> dict:
    return dict(make_set().metadata)


def test_every_metadata_key_has_bad_value_cases():
    assert set(good_metadata()) - FREE_FORM <= set(BAD_VALUES)


@pytest.mark.parametrize("key,value", [(k, v) for k, values in BAD_VALUES.items() for v in values],
                         ids=lambda x: str(x)[:20])
def test_a_crafted_metadata_value_is_one_line_in_show_and_read(tmp_path, capsys, key, value):
    meta = good_metadata()
    meta[key] = value
    run = craft(tmp_path, meta)
    with pytest.raises(artifact.ArtifactError, match="metadata|column|inconsistent"):
        artifact.read_distilled(run)
    assert main(["show", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raydistill: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("raw,problem", [
    (b"[" * 200_000 + b"]" * 200_000, "not a JSON object"),
    (b'{"format_version": 1, "pad": "' + b"x" * (17 * 2**20) + b'"}', "more than any raydistill artifact"),
])
def test_deep_or_huge_metadata_is_refused_before_it_is_used(tmp_path, capsys, raw, problem):
    run = craft(tmp_path, raw)
    assert main(["show", str(run)]) == 2
    assert problem in capsys.readouterr().err


def test_missing_config_labels_out_of_range_and_empty_sets_are_one_line(tmp_path, capsys):
    meta = good_metadata()
    del meta["config"]
    run = craft(tmp_path, meta)
    assert main(["eval", str(run)]) == 2
    assert "holds no config" in capsys.readouterr().err
    path = run / artifact.DISTILLED_FILE
    table = pq.read_table(path)
    pq.write_table(table.set_column(1, "label", pa.array([7] * table.num_rows, pa.int64())), path)
    assert main(["show", str(run)]) == 2
    assert "inconsistent contents" in capsys.readouterr().err
    pq.write_table(table.slice(0, 0), path)
    assert main(["show", str(run)]) == 2
    assert "raydistill: error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- outputs


def test_out_that_is_an_existing_file_is_refused_and_left_alone(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["distill", "--out", str(target), "--quiet"]) == 2
    assert "is an existing file, not a directory" in capsys.readouterr().err
    assert main(["boost", "--block", "1", "--blocks", "2", "--out", str(target / "run"), "--quiet"]) == 2
    assert "is a file, so" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_export_refuses_a_directory_and_an_existing_file_unless_forced(tmp_path, capsys):
    run = craft(tmp_path, good_metadata())
    assert main(["export", str(run), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    existing = tmp_path / "keep.txt"
    existing.write_text("not parquet")
    assert main(["export", str(run), "--out", str(existing)]) == 2
    assert "already exists; choose another file, or pass --force" in capsys.readouterr().err
    assert existing.read_text() == "not parquet"
    assert main(["export", str(run), "--out", str(existing), "--force"]) == 0
    assert artifact.read_distilled(existing).ipc == 3
    assert main(["export", str(run), "--out", str(tmp_path / "absent" / "x.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- trusted storage

import os  # noqa: E402

import yaml  # noqa: E402

from raydistill.tune import load_sweep  # noqa: E402
from raydistill.tune.experiment import check_trusted_storage  # noqa: E402


def test_resume_refuses_an_experiment_folder_others_can_write(tmp_path):
    storage = tmp_path / "storage"
    (storage / "s").mkdir(parents=True)
    os.chmod(tmp_path, 0o700)
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "s", "base": "quickstart", "storage": str(storage),
                                          "search": {"ratbptt.window": {"grid": [5]}}}))
    sweep = load_sweep(sweep_file)
    check_trusted_storage(sweep)  # private: fine
    os.chmod(storage, 0o777)
    with pytest.raises(ConfigError, match=r"storage is writable by other users.*chmod go-w"):
        check_trusted_storage(sweep)
    os.chmod(storage, 0o1777)  # sticky, like /tmp: others cannot replace what is inside
    check_trusted_storage(sweep)
    os.chmod(storage / "s", 0o775)
    with pytest.raises(ConfigError, match="writable by other users"):
        check_trusted_storage(sweep)


# ---------------------------------------------------------------------------------------------- storage failures

import torch  # noqa: E402

import raydistill.engine.driver as driver  # noqa: E402
from raydistill.engine.driver import EngineError, Hooks, distill  # noqa: E402
from raydistill.engine.server import ParameterServer  # noqa: E402

from helpers import STORAGE_TINY as TINY  # noqa: E402


def tiny(*more):
    return load_config("quickstart", TINY + list(more))


def metric_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


class FailsCheckpoints(ParameterServer):
    """Checkpoint writes fail with EACCES while the server's step is in `failing` (a storage outage)."""

    failing: set = set()

    def checkpoint(self):
        if self.step in self.failing:
            raise PermissionError(13, "Permission denied", str(self.checkpoints))
        return super().checkpoint()


@pytest.fixture(autouse=False)
def no_backoff(monkeypatch):
    monkeypatch.setattr(driver, "backoff", lambda attempt: 0.0)


@needs_fashion
def test_a_checkpoint_outage_loses_no_step_record_and_is_reported(tmp_path, capsys, monkeypatch, no_backoff):
    monkeypatch.setattr(FailsCheckpoints, "failing", {4, 5})  # the write due at step 4 fails twice, then works
    run = tmp_path / "run"
    distill(tiny(), run, in_process=True, progress=False, evaluate=False,
            hooks=Hooks(server_cls=FailsCheckpoints))
    assert metric_steps(run) == list(range(1, 9))  # no record lost while the writes failed
    err = capsys.readouterr().err
    assert "checkpoint write failed at step 4 (Permission denied" in err and "(2/3)" in err
    straight = distill(tiny(), tmp_path / "straight", in_process=True, progress=False, evaluate=False)
    assert straight["status"]["applied_steps"] == list(range(8))
    assert torch.equal(artifact.read_distilled(run).images, artifact.read_distilled(tmp_path / "straight").images)


@needs_fashion
def test_checkpoint_writes_failing_past_the_bound_stop_in_one_line_and_resume_to_the_same_set(
        tmp_path, capsys, monkeypatch, no_backoff):
    monkeypatch.setattr(FailsCheckpoints, "failing", set(range(4, 100)))
    run = tmp_path / "run"
    with pytest.raises(EngineError, match=rf"checkpoint writes to {run}/checkpoints failed 3 times in a row.*"
                                          rf"continue with: raydistill distill --resume {run}"):
        distill(tiny(), run, in_process=True, progress=False, evaluate=False,
                hooks=Hooks(server_cls=FailsCheckpoints))
    assert not (run / "distilled.parquet").exists()
    summary = distill(None, run, resume=True, in_process=True, progress=False, evaluate=False)
    assert summary["status"]["step"] == 8 and metric_steps(run) == list(range(1, 9))
    distill(tiny(), tmp_path / "straight", in_process=True, progress=False, evaluate=False)
    assert torch.equal(artifact.read_distilled(run).images, artifact.read_distilled(tmp_path / "straight").images)


@needs_fashion
def test_an_unwritable_run_directory_is_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch, no_backoff):
    def refuse(path, obj):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(driver, "append_jsonl", refuse)
    run = tmp_path / "run"
    assert main(["distill", "--in-process", "--quiet", "--no-eval", "--out", str(run),
                 *(f"--set={s}" for s in TINY)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"raydistill: error: cannot write {run}/metrics.jsonl: Operation not permitted")
    assert err.endswith(f"continue with: raydistill distill --resume {run}")


# ---------------------------------------------------------------------------------------------- a closed local Ray


def test_make_demo_does_not_switch_ray_authentication_off():
    makefile = (REPO / "Makefile").read_text()
    assert not [line for line in makefile.splitlines() if "RAY_AUTH_MODE" in line and not line.lstrip().startswith("#")]
