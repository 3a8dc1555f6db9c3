from __future__ import annotations

from dualscale.cli import main


def test_profile_show_prints_tables(capsys):
    assert main(["profile", "show", "--tp", "4", "--clocks-mhz", "780", "1980"]) == 0
    out = capsys.readouterr().out
    assert "TP4" in out and "1980" in out and "J/token" in out


def test_bad_profile_and_tp_are_clear_errors(capsys):
    assert main(["profile", "show", "no-such-profile"]) == 2
    assert "no such built-in profile" in capsys.readouterr().err
    assert main(["profile", "show", "--tp", "3"]) == 2
    assert "tp = 3" in capsys.readouterr().err


def test_validate_without_data_names_the_missing_file(tmp_path, capsys):
    assert main(["profile", "validate", "--data", str(tmp_path)]) == 2
    assert "file not found" in capsys.readouterr().err
