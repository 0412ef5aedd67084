"""CLI commands that run nothing: the preset list, the grid's order, a refused combination of options."""

from raydistill.cli import main


def test_presets_command_lists_quickstart(capsys):
    assert main(["presets"]) == 0
    assert "quickstart" in capsys.readouterr().out


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
