"""``cpsample evaluate`` end to end on tiny files, and its clear errors."""

import json

import numpy as np
import torch

from cpsample_fast.cli.__main__ import main


def test_evaluate_npz(tmp_path, capsys):
    torch.manual_seed(0)
    train = torch.rand(12, 1, 8, 8) * 2 - 1
    samples = torch.cat([train[:3], torch.rand(4, 1, 8, 8) * 2 - 1])
    np.savez(tmp_path / "s.npz", samples=samples.numpy())
    np.savez(tmp_path / "t.npz", images=train.numpy())
    np.savez(tmp_path / "r.npz", images=(torch.rand(9, 1, 8, 8) * 2 - 1).numpy())
    out = tmp_path / "ev"
    rc = main(
        [
            "evaluate",
            "--samples",
            str(tmp_path / "s.npz"),
            "--train",
            str(tmp_path / "t.npz"),
            "--reference",
            str(tmp_path / "r.npz"),
            "--quality-features",
            "pixels",
            "--thresholds",
            "0.99",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert abs(report["replication"]["replication_rate"]["0.99"] - 3 / 7) < 1e-6
    assert report["quality"]["feature_space"] == "pixels"
    assert (out / "nearest_pairs.png").stat().st_size > 0


def test_evaluate_errors(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", samples=np.zeros((3, 1, 8, 8), np.float32))
    np.savez(tmp_path / "t.npz", images=np.zeros((3, 1, 4, 4), np.float32))
    rc = main(
        [
            "evaluate",
            "--samples",
            str(tmp_path / "s.npz"),
            "--train",
            str(tmp_path / "t.npz"),
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert rc == 2 and "same image shape" in capsys.readouterr().err
    rc = main(
        [
            "evaluate",
            "--samples",
            str(tmp_path / "s.npz"),
            "--train",
            str(tmp_path / "s.npz"),
            "--reference",
            str(tmp_path / "s.npz"),
            "--quality-features",
            "inception",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert rc == 2 and "--inception-weights" in capsys.readouterr().err
