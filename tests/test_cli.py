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


def test_choices_come_from_the_library():
    from cpsample_fast import guidance, ops, solvers

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices

    def choices(cmd, dest):
        return tuple(next(a for a in sub[cmd]._actions if a.dest == dest).choices)

    assert choices("sample", "mode") == guidance.MODES
    assert choices("sample", "backend") == ops.BACKENDS
    assert choices("sample", "solver") == solvers.SOLVERS
    assert choices("demo", "mode") == guidance.MODES
    assert choices("evaluate", "mode") == guidance.MODES


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
