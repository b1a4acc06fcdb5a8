"""The ``cpsample`` dispatcher: help for every subcommand, clear exit for a missing one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cpsample_fast.cli import __main__ as cli


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"cpsample {name}" in out and "--" in out


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "cpsample_fast", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for name in cli.SUBCOMMANDS:
        assert name in proc.stdout


def test_missing_subcommand_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "future-thing", "no_such_module")
    assert cli.main(["future-thing"]) == 2
    assert "not implemented in this version" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
