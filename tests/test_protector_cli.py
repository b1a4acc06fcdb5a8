"""``cpsample train-protector`` through its module's ``add_arguments`` / ``main``."""

import argparse
import json

import numpy as np
import pytest

from cpsample_fast.cli import train_protector as cli
from cpsample_fast.data import load_digits
from cpsample_fast.protector import load_protector, verify_protector


def _run(argv):
    """``cpsample train-protector ARGV`` through the top-level entry point, whose one handler
    turns bad input into one line on stderr and exit status 2."""
    from cpsample_fast.cli.__main__ import main

    return main(["train-protector", *argv])


def test_digits_writes_checkpoint_report_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", "digits", "--n", "9", "--size", "8", "--holdout", "4", "--steps", "6",
            "--batch-size", "5", "--width", "8", "--report-bins", "3", "--no-progress",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert _run(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = {p.name for p in out.iterdir()}
    assert {"protector.safetensors", "protector.json", "report.json", "report.png"} <= names
    assert result["members"] == 9 and result["holdout"] == 4 and result["steps_run"] == 6
    net, meta = load_protector(out / "protector.safetensors")
    assert verify_protector(meta, load_digits(9, size=8))
    report = json.loads((out / "report.json").read_text())
    assert len(report["member"]["accuracy"]) == 3 and report["holdout"] is not None
    assert report["labels"] == meta["labels"]
    # Running the same command again resumes the finished state instead of retraining.
    assert _run(argv) == 0
    _, meta2 = load_protector(out / "protector.safetensors")
    assert meta2["labels"] == meta["labels"] and meta2["fingerprint"] == meta["fingerprint"]


def test_bad_input_gives_a_clear_message_and_no_files(tmp_path, capsys):
    arr = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(np.float32) * 4
    np.savez(tmp_path / "x.npz", images=arr)
    base = ["--steps", "2", "--width", "8", "--no-progress", "--device", "cpu"]
    out = tmp_path / "o"
    assert _run(["--data", "npz", "--path", str(tmp_path / "x.npz"), *base, "--out", str(out)]) == 2
    assert "--normalize" in capsys.readouterr().err
    assert not any(p.suffix in (".safetensors", ".json") for p in out.rglob("*"))
    ok = ["--data", "npz", "--path", str(tmp_path / "x.npz"), "--normalize", "--batch-size", "3"]
    assert _run([*ok, *base, "--report-bins", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert (
        _run(["--data", "npz", "--path", str(tmp_path / "missing.npz"), *base, "--out", str(out)])
        == 2
    )
    assert "no .npz file" in capsys.readouterr().err
    assert _run(["--data", "folder", *base, "--out", str(out)]) == 2
    assert "needs --path" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _run(["--data", "digits", "--n", "4", *base, "--out", str(blocker / "o")]) == 2
    assert "not a writable directory" in capsys.readouterr().err
    assert (
        _run(["--data", "digits", "--n", "4", "--holdout", "1800", *base, "--out", str(out)]) == 2
    )
    assert "1797" in capsys.readouterr().err


def test_parser_requires_data_and_out():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "3"])


def test_options_map_onto_config_fields():
    """Every option the command passes through by name is a ProtectorTrainConfig field, and the
    parsed defaults build a valid config (the mapping cannot drift from the library)."""
    import dataclasses

    from cpsample_fast.protector import ProtectorTrainConfig

    fields = {f.name for f in dataclasses.fields(ProtectorTrainConfig)}
    assert set(cli.CONFIG_OPTIONS) <= fields
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--data", "digits", "--out", "o", "--lr", "0.01", "--no-resume"])
    cfg = cli.training_config(args, "cpu", "o/train_state")
    assert (cfg.lr, cfg.steps, cfg.resume, cfg.progress, cfg.latent) == (
        0.01,
        1000,
        False,
        True,
        False,
    )
