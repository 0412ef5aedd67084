"""Checkpoints: bit-exact round trips, pruning, detection of truncated / corrupt / foreign files, crash-safe writes,
and loading without ever unpickling."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile

import numpy as np
import pytest
import torch

from raydistill.storage.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    arrays_to_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    state_to_arrays,
)
from raydistill.config import MetaOptConfig
from helpers import forbid_pickle, make_meta, named



def tricky_arrays() -> dict[str, np.ndarray]:
    """Values a lossy format would get wrong: -0.0, NaN, inf, subnormals, int64 extremes, odd shapes."""
    special = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, np.nextafter(1.0, 2.0)]
    return {
        "f32": np.array(special, dtype=np.float32).reshape(7, 1),
        "f64": np.array(special + [5e-324], dtype=np.float64),
        "i64": np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max], dtype=np.int64),
        "scalar": np.array(3.25, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "file": np.arange(2),  # names np.savez would take as its own keywords still work
        "allow_pickle": np.arange(3),
    }


def assert_bit_exact(a, b) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def make_optimizer(labels: bool, steps: int):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 1, 3, 3, generator=gen)
    soft = torch.eye(2).repeat(2, 1) if labels else None
    opt = make_meta(images, soft, MetaOptConfig())
    for _ in range(steps):
        grad_labels = torch.randn(4, 2, generator=gen) if labels else None
        opt.step(named(torch.randn(4, 1, 3, 3, generator=gen), grad_labels))
    return opt


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(b[key], torch.Tensor), key
            assert value.dtype == b[key].dtype, key
            assert_bit_exact(value.numpy(), b[key].numpy())
        else:
            assert type(value) is type(b[key]) and value == b[key], key


def wrap(payload: bytes) -> bytes:
    """A file with a valid RDCK header around `payload` (to build hostile checkpoints)."""
    return f"RDCK 1 sha256={hashlib.sha256(payload).hexdigest()} bytes={len(payload)}\n".encode() + payload


def test_arrays_and_meta_round_trip_bit_exact(tmp_path):
    meta = {"step": 7, "loss": 0.1, "big": 2**70, "inf": float("inf"), "none": None, "nested": {"a": [1, "x"]}}
    path = save_checkpoint(tmp_path, 7, tricky_arrays(), meta)
    assert path == tmp_path / "ckpt-00000007.rdck"
    arrays, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    assert arrays.keys() == tricky_arrays().keys()
    for name, expected in tricky_arrays().items():
        assert_bit_exact(arrays[name], expected)


def test_state_dict_round_trip_bit_exact(tmp_path):
    state = {
        "f32": torch.tensor([0.1, -0.0, float("nan")], dtype=torch.float32),
        "f64": torch.randn(2, 3, dtype=torch.float64),
        "i64": torch.tensor([-(2**63), 2**63 - 1]),
        "rng": torch.get_rng_state(),  # uint8
        "grad_norm_ema": 0.30000000000000004,
        "updates": 3,
        "ema": None,
        "flag": True,
        "name": "run",
        "history": [1, 2.5, None],
    }
    arrays, meta = state_to_arrays(state)
    save_checkpoint(tmp_path, 1, arrays, meta)
    restored = arrays_to_state(*load_checkpoint(tmp_path / "ckpt-00000001.rdck"))
    assert_same_state(state, restored)


@pytest.mark.parametrize("labels", [True, False])
def test_meta_optimizer_resumes_exactly(tmp_path, labels):
    opt = make_optimizer(labels, steps=3)
    save_checkpoint(tmp_path, 3, *state_to_arrays(opt.state_dict()))

    _, arrays, meta = latest_checkpoint(tmp_path)
    resumed = make_optimizer(labels, steps=0)
    resumed.load_state_dict(arrays_to_state(arrays, meta))
    assert_same_state(opt.state_dict(), resumed.state_dict())

    # The resumed optimizer continues exactly as the original would have.
    grad = torch.full((4, 1, 3, 3), 0.5)
    grad_labels = torch.full((4, 2), -0.25) if labels else None
    opt.step(named(grad, grad_labels))
    resumed.step(named(grad, grad_labels))
    assert_same_state(opt.state_dict(), resumed.state_dict())


def test_only_keep_newest_remain_and_other_files_are_ignored(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / ".ckpt-00000009.rdck.abc.tmp").write_bytes(b"left by a crash")
    for step in [1, 2, 3, 10, 4]:
        save_checkpoint(tmp_path, step, {"x": np.arange(step)}, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000010.rdck", "ckpt-00000004.rdck"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert (tmp_path / ".ckpt-00000009.rdck.abc.tmp").exists()  # not ours to delete, and never loaded


def test_pruning_never_deletes_the_file_just_written(tmp_path):
    # A run restarted from an earlier step writes lower-numbered checkpoints than the ones already there.
    for step in [10, 11]:
        save_checkpoint(tmp_path, step, {}, {"step": step}, keep=2)
    save_checkpoint(tmp_path, 5, {}, {"step": 5}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-00000011.rdck", "ckpt-00000010.rdck", "ckpt-00000005.rdck",
    ]  # fmt: skip


def test_save_creates_the_folder(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    save_checkpoint(folder, 0, {}, {"ok": True})
    assert load_checkpoint(folder / "ckpt-00000000.rdck") == ({}, {"ok": True})


def test_truncated_newest_falls_back_to_previous_with_warning(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": np.arange(100.0)}, {"step": 1})
    newest = save_checkpoint(tmp_path, 2, {"x": np.arange(100.0) * 2}, {"step": 2})
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match=r"ckpt-00000002\.rdck: truncated"):
        load_checkpoint(newest)
    with pytest.warns(CheckpointWarning, match=r"ckpt-00000002\.rdck.*previous good one, ckpt-00000001\.rdck"):
        path, arrays, meta = latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000001.rdck" and meta == {"step": 1}
    assert_bit_exact(arrays["x"], np.arange(100.0))


def test_one_byte_flip_in_payload_is_caught_by_checksum(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"x": np.arange(1000, dtype=np.float32)}, {})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the array data: the npz itself would still parse
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_header_damage_is_caught(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"x": np.arange(10)}, {})
    data = path.read_bytes()
    path.write_bytes(data + b"junk")
    with pytest.raises(CheckpointError, match="unexpected bytes after"):
        load_checkpoint(path)
    path.write_bytes(data.replace(b"RDCK 1 ", b"RDCK 2 ", 1))
    with pytest.raises(CheckpointError, match="format version 2 is not supported"):
        load_checkpoint(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="header line is cut off"):
        load_checkpoint(path)


def test_foreign_and_missing_files_raise_checkpoint_error(tmp_path):
    npz = tmp_path / "plain.npz"
    np.savez(npz, x=np.arange(3))
    text = tmp_path / "ckpt-00000001.rdck"
    text.write_text("hello\n")
    for path in (npz, text):
        with pytest.raises(CheckpointError, match=rf"{path.name}: not a raydistill checkpoint"):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.rdck")
    # A valid header around something that is not an npz archive.
    (tmp_path / "fake.rdck").write_bytes(wrap(b"not a zip"))
    with pytest.raises(CheckpointError, match="not an npz archive"):
        load_checkpoint(tmp_path / "fake.rdck")


def test_all_corrupt_raises_and_empty_folder_is_none(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2):
        path = save_checkpoint(tmp_path, step, {"x": np.arange(50)}, {})
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: none of the 2 checkpoints loads.*start a new run"):
        latest_checkpoint(tmp_path)


def test_crash_during_write_keeps_previous_and_leaves_no_temp_files(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"x": np.arange(5)}, {"step": 1}, keep=1)

    def crash(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, {"x": np.arange(6)}, {"step": 2}, keep=1)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.rdck"]
    path, arrays, meta = latest_checkpoint(tmp_path)
    assert meta == {"step": 1}
    assert_bit_exact(arrays["x"], np.arange(5))


def test_object_arrays_and_reserved_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="object dtype"):
        save_checkpoint(tmp_path, 1, {"bad": np.array([{"a": 1}], dtype=object)}, {})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 1, {"__meta__": np.zeros(1)}, {})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, {}, {"tensor": torch.zeros(1)})
    with pytest.raises(ValueError, match="torch tensor or plain"):
        state_to_arrays({"array": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_loading_never_unpickles(tmp_path, monkeypatch):
    opt = make_optimizer(labels=True, steps=2)
    save_checkpoint(tmp_path, 2, *state_to_arrays(opt.state_dict()))
    forbid_pickle(monkeypatch)
    arrays, meta = load_checkpoint(tmp_path / "ckpt-00000002.rdck")
    _, arrays, meta = latest_checkpoint(tmp_path)
    assert_same_state(opt.state_dict(), arrays_to_state(arrays, meta))


def test_pickled_object_array_with_valid_checksum_is_refused_unopened(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        with zf.open("evil.npy", "w") as fh:
            np.lib.format.write_array(fh, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        with zf.open("__meta__.npy", "w") as fh:
            np.lib.format.write_array(fh, np.frombuffer(b"{}", dtype=np.uint8))
    path = tmp_path / "ckpt-00000001.rdck"
    path.write_bytes(wrap(buf.getvalue()))
    forbid_pickle(monkeypatch)
    with pytest.raises(CheckpointError, match="unreadable npz payload"):
        load_checkpoint(path)


def test_payload_is_a_plain_npz_after_the_header_line(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"x": np.arange(4)}, {"a": 1})
    header, payload = path.read_bytes().split(b"\n", 1)
    assert header.startswith(b"RDCK 1 sha256=") and header.endswith(f"bytes={len(payload)}".encode())
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        assert_bit_exact(npz["x"], np.arange(4))
        assert npz["__meta__"].tobytes() == b'{"a": 1}'
