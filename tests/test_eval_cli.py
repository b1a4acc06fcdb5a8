"""``cpsample evaluate`` end to end on tiny files, and its clear errors."""

import json

import numpy as np
import pytest
import torch

from cpsample_fast.cli.__main__ import main
from cpsample_fast.data import normalize_images


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


def _base(tmp_path):
    np.savez(
        tmp_path / "s.npz",
        samples=np.random.default_rng(0).uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32),
    )
    return ["evaluate", "--samples", str(tmp_path / "s.npz"), "--train", str(tmp_path / "s.npz")]


@pytest.mark.parametrize(
    ("extra", "named", "needs"),
    [
        (["--nonmembers", "x.npz"], ["--nonmembers"], "--model"),
        (["--protector", "p"], ["--protector"], "--model"),
        (["--timesteps", "5"], ["--timesteps"], "--model"),
        (["--scale", "3", "--alpha", "0.1", "--mode", "attract"], ["--scale", "--alpha", "--mode"],
         "--protector"),
        (["--quality-features", "pixels"], ["--quality-features"], "--reference"),
        (["--inception-weights", "w.pth"], ["--inception-weights"], "--reference"),
    ],
)  # fmt: skip
def test_options_without_what_they_need_are_errors(tmp_path, capsys, extra, named, needs):
    rc = main([*_base(tmp_path), *extra, "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    print(err)
    assert rc == 2
    assert all(opt in err for opt in named)
    assert f"need{'s' if len(named) == 1 else ''} {needs}" in err
    assert not (tmp_path / "ev").exists()  # refused before creating or loading anything


def test_ignored_options_all_named_at_once(tmp_path, capsys):
    rc = main([*_base(tmp_path), "--scale", "3", "--quality-features", "pixels", "--out",
               str(tmp_path / "ev")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--scale" in err and "--quality-features" in err
    assert "--protector" in err and "--reference" in err


@pytest.fixture(scope="module")
def membership_assets(tmp_path_factory, write_tiny_assets):
    """A tiny UNet checkpoint, a protector of ``members`` and member/other image files."""
    # Raw floats in [0, 50]: only loadable with --normalize, exactly like train-protector.
    raw = torch.rand(5, 1, 8, 8) * 50
    members = normalize_images(raw)
    d = write_tiny_assets(tmp_path_factory.mktemp("membership"), members, steps=1, batch_size=3)
    np.savez(d / "members_raw.npz", images=raw.numpy())
    np.savez(d / "members.npz", images=members.numpy())
    np.savez(d / "other.npz", images=(torch.rand(5, 1, 8, 8) * 2 - 1).numpy())
    np.savez(d / "non.npz", images=(torch.rand(3, 1, 8, 8) * 2 - 1).numpy())
    return d


def _attack(d, out, train, *extra):
    return main(
        [
            "evaluate",
            "--samples", str(d / "members.npz"),
            "--train", str(d / train),
            "--model", str(d / "unet.safetensors"),
            "--nonmembers", str(d / "non.npz"),
            "--protector", str(d / "protector"),
            "--timesteps", "10",
            "--scale", "5",
            "--out", str(out),
            *extra,
        ]
    )  # fmt: skip


def test_protector_of_other_images_is_refused(membership_assets, tmp_path, capsys):
    rc = _attack(membership_assets, tmp_path / "ev", "other.npz")
    err = capsys.readouterr().err
    print(err)
    assert rc == 2 and "does not protect" in err and "pixel hash" in err
    assert not (tmp_path / "ev" / "evaluation.json").exists()


def test_normalize_loads_training_data_like_train_protector(membership_assets, tmp_path, capsys):
    d = membership_assets
    # Without --normalize the raw floats are out of range: a clear error.
    assert _attack(d, tmp_path / "a", "members_raw.npz") == 2
    assert "--normalize" in capsys.readouterr().err
    rc = _attack(d, tmp_path / "b", "members_raw.npz", "--normalize")
    printed = capsys.readouterr()
    print(printed.out, printed.err)
    assert rc == 0
    report = json.loads((tmp_path / "b" / "evaluation.json").read_text())
    assert len(report["membership"]) == 2  # through ε and through ε̂ (protector verified)
    # The samples are the members themselves: every one is a replica.
    assert report["replication"]["replication_rate"]["0.95"] == 1.0


def test_grayscale_folder(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, a in enumerate(rgb):
        Image.fromarray(a).save(folder / f"{i}.png")
    gray = (
        torch.stack([torch.from_numpy(np.array(Image.fromarray(a).convert("L"))) for a in rgb])[
            :, None
        ].float()
        / 127.5
        - 1
    )  # [3, 1, 8, 8]
    np.savez(tmp_path / "s.npz", samples=gray.numpy())
    args = ["evaluate", "--samples", str(tmp_path / "s.npz"), "--train", str(folder)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2  # 3 channels vs 1
    assert "same image shape" in capsys.readouterr().err
    assert main([*args, "--grayscale", "--thresholds", "0.99", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "evaluation.json").read_text())
    assert report["replication"]["replication_rate"]["0.99"] == 1.0


def test_blurred_two_sided_and_rejection_run(membership_assets, tmp_path, capsys):
    """evaluate reports blurred replication, the two-sided attack and a rejection run, each
    checked against the library called directly."""
    from cpsample_fast.eval import blurred_replication, membership_inference
    from cpsample_fast.models import load_unet
    from cpsample_fast.protector import load_protector
    from cpsample_fast.schedule import NoiseSchedule

    d = membership_assets
    rc = _attack(d, tmp_path / "ev", "members.npz", "--rejection-alpha", "0.01",
                 "--rejection-steps", "3", "--rejection-budget", "12")  # fmt: skip
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0
    rep = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    members = torch.from_numpy(np.load(d / "members.npz")["images"])
    want = blurred_replication(members, members, sigma=1.0, thresholds=(0.95, 0.97))
    assert rep["replication_blurred"]["replication_rate"]["0.95"] == want.rates[0.95]
    assert "blur sigma=1 px" in rep["replication_blurred"]["features"]
    model, _ = load_unet(d / "unet.safetensors")
    prot, _ = load_protector(d / "protector")
    non = torch.from_numpy(np.load(d / "non.npz")["images"])
    direct = membership_inference(model, members, non, NoiseSchedule(), timesteps=(10,),
                                  protector=prot, scale=5.0, alpha=0.001)  # fmt: skip
    m = rep["membership"][1]
    assert m["threat_model"] == "eps_hat"
    assert m["two_sided"]["auc"] == pytest.approx(direct.auc_two_sided)
    assert m["two_sided"]["abs_z"] == pytest.approx(direct.abs_z)
    assert "two-sided AUC=" in printed
    rj = rep["rejection"]
    assert rj["n_drawn"] >= rj["n_accepted"] and rj["params"]["alpha"] == 0.01
    assert rj["model_evaluations"] == 3 * rj["n_drawn"]
    assert "rejection sampling accepted" in printed
