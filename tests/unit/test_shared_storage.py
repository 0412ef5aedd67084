"""Runs on shared storage: run directories named by a URI (raydistill.storage.store).

file:// is the local folder it names; other URIs go through pyarrow.fs or fsspec. The tests use fsspec's in-process
`memory://` file system as the stand-in for a remote store (nothing on it is a local file), a recording handler to see
how files are published. A simulated two-node cluster, for a parameter server that resumes on another node from the
checkpoint in a shared folder, is in tests/integration/test_shared_storage_cluster.py.
"""

from __future__ import annotations

import json
import os
import stat
import uuid

import fsspec
import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import yaml
from helpers import STORAGE_TINY as TINY, forbid_pickle, needs_fashion

from raydistill.cli import main
from raydistill.config import ConfigError
from raydistill.setup import load_config
from raydistill.engine import driver
from raydistill.engine.driver import EngineError, Hooks, distill
from raydistill.engine.server import ParameterServer
from raydistill.storage import artifact, atomic, run_dir as rundir, store
from raydistill.storage.checkpoint import CheckpointWarning, latest_checkpoint, list_checkpoints, save_checkpoint
from raydistill.storage.store import Location, location


def tiny(*more):
    return load_config("quickstart", TINY + list(more))


@pytest.fixture
def memory_uri():
    """A fresh folder on fsspec's in-process file system; removed afterwards."""
    folder = f"/raydistill-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{folder}"
    memory = fsspec.filesystem("memory")
    if memory.exists(folder):
        memory.rm(folder, recursive=True)


class Recording(pafs.FSSpecHandler):
    """An fsspec-backed pyarrow handler that records the paths written to and the moves made."""

    def __init__(self, fs):
        super().__init__(fs)
        self.opened: list[str] = []
        self.moves: list[tuple[str, str]] = []
        self.fail_moves = False

    def open_output_stream(self, path, metadata):
        self.opened.append(path)
        return super().open_output_stream(path, metadata)

    def move(self, src, dest):
        if self.fail_moves:
            raise OSError("simulated outage during the move")
        self.moves.append((src, dest))
        return super().move(src, dest)


def recording(memory_uri: str) -> tuple[Location, Recording]:
    handler = Recording(fsspec.filesystem("memory"))
    path = memory_uri[len("memory://"):]
    return Location(pafs.PyFileSystem(handler), path, memory_uri, "memory"), handler


def memory_files(memory_uri: str) -> list[str]:
    root = memory_uri[len("memory://"):]
    return sorted(p[len(root) + 1:] for p in fsspec.filesystem("memory").find(root))


# ---------------------------------------------------------------------------------------------- locations


def test_a_file_uri_is_the_plain_path_and_other_uris_are_locations(tmp_path, memory_uri):
    assert location(f"file://{tmp_path}/run") == tmp_path / "run"
    assert location(str(tmp_path / "run")) == tmp_path / "run"
    assert location(tmp_path) == tmp_path
    run = location(memory_uri)
    assert isinstance(run, Location) and str(run) == memory_uri
    assert str(run / "checkpoints" / "ckpt-1.rdck") == f"{memory_uri}/checkpoints/ckpt-1.rdck"
    assert (run / "a").parent == run and (run / "a").name == "a"
    with pytest.raises(TypeError):
        open(run)  # not os.PathLike: nothing writes a local folder named like the URI by mistake


@pytest.mark.parametrize("text, message", [
    ("nosuchscheme://bucket/run", "unknown URI scheme nosuchscheme://"),
    ("s3://", "not a path or a URI naming a folder"),
    ("file://relative/run", "not a location pyarrow can open"),
])
def test_a_uri_that_cannot_be_opened_is_one_line(text, message):
    with pytest.raises(ConfigError, match=message) as caught:
        location(text)
    assert "\n" not in str(caught.value)


def test_a_uri_query_stays_at_the_end_of_every_name(memory_uri):
    run = Location(location(memory_uri).fs, memory_uri[len("memory://"):], memory_uri, "memory", "anon=true")
    assert str(run / "metrics.jsonl") == f"{memory_uri}/metrics.jsonl?anon=true"
    assert str((run / "metrics.jsonl").parent) == f"{memory_uri}?anon=true"


def test_writes_publish_whole_files_through_a_temporary_name(memory_uri):
    run, handler = recording(memory_uri)
    target = run / "eval.json"
    atomic.atomic_write_json(target, {"a": 1})
    (tmp, final), = handler.moves
    assert final == target.path and tmp != final and handler.opened == [tmp]
    assert json.loads(target.read_text()) == {"a": 1}

    handler.fail_moves = True  # the store goes away between the write and the move
    with pytest.raises(OSError, match="simulated outage"):
        atomic.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}  # the old file, whole
    assert memory_files(memory_uri) == ["eval.json"]  # and no temporary file left behind


def test_on_an_object_store_a_finished_file_is_one_put(memory_uri, monkeypatch):
    run, handler = recording(memory_uri)
    monkeypatch.setattr(store, "OBJECT_STORES", store.OBJECT_STORES | {run.fs.type_name})
    with atomic.atomic_path(run / "grid.png") as tmp:
        tmp.write_bytes(b"picture")
        assert not (run / "grid.png").exists()  # nothing is visible before the block succeeds
    assert handler.opened == [(run / "grid.png").path] and handler.moves == []
    assert (run / "grid.png").read_bytes() == b"picture"

    with pytest.raises(RuntimeError, match="power cut"):
        with atomic.atomic_path(run / "grid.png") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("power cut")
    assert (run / "grid.png").read_bytes() == b"picture" and len(handler.opened) == 1


def test_metrics_append_on_a_store_that_cannot_append(memory_uri):
    run = location(memory_uri)
    for step in range(3):
        atomic.append_jsonl(run / "metrics.jsonl", {"step": step})
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    driver.keep_metrics_up_to(run / "metrics.jsonl", 1)  # what a restarted run does before redoing steps
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_on_a_uri_prune_skip_a_damaged_one_and_never_unpickle(memory_uri, monkeypatch):
    folder = location(memory_uri) / "checkpoints"
    for step in (2, 4, 6, 8):
        save_checkpoint(folder, step, {"x": np.arange(step)}, {"step": step}, keep=3)
    assert [p.name for p in list_checkpoints(memory_uri + "/checkpoints")] == [
        "ckpt-00000008.rdck", "ckpt-00000006.rdck", "ckpt-00000004.rdck"]
    newest = list_checkpoints(folder)[0]
    newest.write_atomic(newest.read_bytes()[:-7])  # a copy cut short
    forbid_pickle(monkeypatch)
    with pytest.warns(CheckpointWarning, match="truncated"):
        path, arrays, meta = latest_checkpoint(folder)
    assert path.name == "ckpt-00000006.rdck" and meta == {"step": 6}
    assert np.array_equal(arrays["x"], np.arange(6))


# ---------------------------------------------------------------------------------------------- whole runs


@needs_fashion
def test_a_run_to_a_file_uri_or_a_remote_store_gives_the_artifact_of_a_plain_path(tmp_path, memory_uri):
    plain = distill(tiny(), tmp_path / "plain", in_process=True, progress=False, evaluate=False)
    by_uri = distill(tiny(), f"file://{tmp_path}/uri", in_process=True, progress=False, evaluate=False)
    remote = distill(tiny(), memory_uri, in_process=True, progress=False, evaluate=False)
    assert by_uri["run_dir"] == str(tmp_path / "uri") and remote["run_dir"] == memory_uri
    expected = artifact.read_distilled(tmp_path / "plain")
    for other in (f"file://{tmp_path}/uri", memory_uri):
        got = artifact.read_distilled(other)
        assert torch.equal(got.images, expected.images) and torch.equal(got.labels, expected.labels)
        assert got.metadata["selected_step"] == expected.metadata["selected_step"]
    assert plain["status"]["applied_steps"] == remote["status"]["applied_steps"] == list(range(8))

    files = memory_files(memory_uri)
    assert {"config.yaml", "metrics.jsonl", "distilled.parquet", "grid.png"} <= set(files)
    assert [f for f in files if f.startswith("checkpoints/")] == [
        f"checkpoints/ckpt-0000000{s}.rdck" for s in (4, 6, 8)]
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)  # the curves, copied in at the end
    assert not store.local_dir(location(memory_uri)).exists()
    assert not [f for f in files if f.rsplit("/", 1)[-1].startswith(".")]  # no temporary files


class FailsCheckpoints(ParameterServer):
    """Checkpoint writes fail from step 4 on (a storage outage): the run stops after its retries."""

    def checkpoint(self):
        if self.step >= 4:
            raise PermissionError(13, "Permission denied", str(self.checkpoints))
        return super().checkpoint()


@needs_fashion
def test_an_interrupted_run_on_a_uri_resumes_from_it_to_the_same_set(tmp_path, memory_uri, monkeypatch, capsys):
    monkeypatch.setattr(driver, "backoff", lambda attempt: 0.0)
    with pytest.raises(EngineError, match=f"continue with: raydistill distill --resume {memory_uri}"):
        distill(tiny(), memory_uri, in_process=True, progress=False, evaluate=False,
                hooks=Hooks(server_cls=FailsCheckpoints))
    assert not (location(memory_uri) / "distilled.parquet").exists()
    assert main(["distill", "--resume", memory_uri, "--in-process", "--quiet", "--no-eval"]) == 0
    assert main(["distill", "--resume", memory_uri, "--in-process", "--quiet", "--no-eval"]) == 0  # finished: left
    assert "already finished" in capsys.readouterr().out
    records = (location(memory_uri) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in records] == list(range(1, 9))  # redone steps logged once

    distill(tiny(), tmp_path / "straight", in_process=True, progress=False, evaluate=False)
    resumed = artifact.read_distilled(memory_uri)
    assert torch.equal(resumed.images, artifact.read_distilled(tmp_path / "straight").images)


@needs_fashion
def test_show_and_export_read_a_run_on_a_uri(tmp_path, memory_uri, capsys):
    distill(tiny("steps=2"), memory_uri, in_process=True, progress=False, evaluate=False)
    capsys.readouterr()
    assert main(["show", memory_uri]) == 0
    shown = capsys.readouterr().out
    assert f"run:      {memory_uri}" in shown and "last:     step 2" in shown
    assert f"tensorboard --logdir {memory_uri}" in shown
    exported = f"{memory_uri}-export/ipc1.parquet"
    assert main(["export", memory_uri, "--out", exported]) == 0
    assert torch.equal(artifact.read_distilled(exported).images, artifact.read_distilled(memory_uri).images)
    assert main(["export", f"file://{tmp_path}", "--out", str(tmp_path / "x.parquet")]) == 2  # not a run: one line
    fsspec.filesystem("memory").rm(f"{memory_uri[len('memory://'):]}-export", recursive=True)


@needs_fashion
def test_boost_writes_its_stages_and_nested_set_to_a_uri(tmp_path, memory_uri):
    args = ["--preset", "quickstart", "--set", "model.width=8", "--set", "ratbptt.unroll=4", "--set",
            "ratbptt.window=2", "--set", "data.val_size=200", "--set", "eval.every=0", "--in-process", "--quiet",
            "--no-eval", "--block", "1", "--blocks", "2", "--steps-per-block", "2"]
    assert main(["boost", "--out", memory_uri, *args]) == 0
    assert main(["boost", "--out", str(tmp_path / "plain"), *args]) == 0
    got, expected = artifact.read_distilled(memory_uri), artifact.read_distilled(tmp_path / "plain")
    assert got.ipc == 2 and torch.equal(got.images, expected.images) and torch.equal(got.blocks, expected.blocks)
    files = memory_files(memory_uri)
    assert {"stage-1/distilled.parquet", "stage-2/distilled.parquet", "distilled.parquet"} <= set(files)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_locations_are_one_line_errors_and_leave_runs_alone(tmp_path, memory_uri, capsys):
    run = location(memory_uri)
    atomic.atomic_write_text(run / "config.yaml", "steps: 8\n")
    before = memory_files(memory_uri)
    cases = [
        (["distill", "--out", memory_uri, "--in-process", "--quiet"], "already exists and is not empty"),
        (["distill", "--out", memory_uri, "--quiet"], "lives inside this process only"),
        (["distill", "--out", "nosuchscheme://bucket/run", "--quiet"], "unknown URI scheme nosuchscheme://"),
        (["show", "nosuchscheme://bucket/run"], "unknown URI scheme"),
        (["boost", "--out", memory_uri, "--in-process", "--block", "1", "--blocks", "2"],
         "already exists and is not empty"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and err.startswith("raydistill: error:"), (argv, err)
    assert memory_files(memory_uri) == before
    assert (run / "config.yaml").read_text() == "steps: 8\n"


def test_check_fresh_and_resume_on_a_uri(memory_uri):
    run = location(memory_uri)
    assert rundir.check_fresh(memory_uri) == run  # missing: fine
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        rundir.resumable_config(run)
    atomic.atomic_write_text(run / "metrics.jsonl", "")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        rundir.check_fresh(memory_uri)
    assert rundir.resume_command(run / "stage-1") == f"raydistill distill --resume {memory_uri}/stage-1"


# ---------------------------------------------------------------------------------------------- Tune


def write_sweep(folder, storage: str):
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": "quickstart", "storage": storage,
                                    "search": {"ratbptt.window": {"grid": [2]}}}))
    return path


def test_a_sweep_storage_with_an_unknown_or_process_local_scheme_is_refused(tmp_path):
    from raydistill.tune.sweep import load_sweep

    with pytest.raises(ConfigError, match="storage: nosuchscheme://x/y has the unknown URI scheme"):
        load_sweep(write_sweep(tmp_path, "nosuchscheme://x/y"))
    with pytest.raises(ConfigError, match="storage: memory://x lives inside one process only"):
        load_sweep(write_sweep(tmp_path, "memory://x"))
    assert load_sweep(write_sweep(tmp_path, f"file://{tmp_path}/store")).storage == f"file://{tmp_path}/store"


def test_resuming_a_sweep_from_a_file_uri_checks_the_folder_like_a_path(tmp_path):
    from raydistill.tune.experiment import check_trusted_storage
    from raydistill.tune.sweep import load_sweep

    shared = tmp_path / "shared"
    (shared / "tiny").mkdir(parents=True)
    os.chmod(shared, os.stat(shared).st_mode | stat.S_IWOTH)
    try:
        with pytest.raises(ConfigError, match=f"{shared} is writable by other users"):
            check_trusted_storage(load_sweep(write_sweep(tmp_path, f"file://{shared}")))
    finally:
        os.chmod(shared, os.stat(shared).st_mode & ~stat.S_IWOTH)
    check_trusted_storage(load_sweep(write_sweep(tmp_path, f"file://{shared}")))


def test_sweep_outputs_go_to_a_uri(tmp_path, memory_uri):
    from raydistill.tune.report import output_dir, plot
    from raydistill.tune.sweep import load_sweep

    sweep = load_sweep(write_sweep(tmp_path, str(tmp_path / "store")))
    folder = output_dir(sweep, memory_uri)
    assert folder == location(memory_uri)
    rows = [{"trial": "t000", "ratbptt.window": 2, "status": "done", "val_acc": 50.0, "step": 8, "steps": 8}]
    pytest.importorskip("matplotlib")
    assert plot(sweep, rows, folder / "plot.png") == f"{memory_uri}/plot.png"
    assert (folder / "plot.png").read_bytes().startswith(b"\x89PNG")
