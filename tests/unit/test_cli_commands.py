"""CLI commands that run nothing: the preset list, the grid's order, a refused combination of options."""

from raydistill.cli import main


def test_presets_command_lists_presets_with_their_planned_peak_and_keeps_it(tmp_path, capsys, monkeypatch):
    from raydistill import cli
    from raydistill.plan import presets

    names = ["dm-fashion-mnist-ipc1", "quickstart"]
    monkeypatch.setattr(cli, "preset_names", lambda: names)
    monkeypatch.setattr(presets, "preset_names", lambda: names)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["presets"]) == 0
    first = capsys.readouterr()
    assert first.err.count("planning ") == 2
    row = next(line for line in first.out.splitlines() if line.startswith("quickstart"))
    assert " MiB on cpu " in row or " GiB on cpu " in row
    assert main(["presets"]) == 0  # from the cache: nothing planned again
    second = capsys.readouterr()
    assert second.err == "" and second.out == first.out
    presets.cache_file().write_text("{not json")  # a damaged cache is planned again, not trusted
    assert main(["presets"]) == 0
    assert capsys.readouterr().err.count("planning ") == 2


def test_grid_puts_one_class_per_column():
    import torch

    from raydistill.storage.pictures import grid_order

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert labels[grid_order(labels)].tolist() == [0, 1, 2, 0, 1, 2]


def test_in_process_with_an_address_is_refused_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["distill", "--in-process", "--address", "auto", "--out", str(out)]) == 2
    assert "--in-process: runs without Ray" in capsys.readouterr().err
    assert not out.exists()
