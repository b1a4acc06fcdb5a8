"""Protector checkpoints, the dataset fingerprint and verify_protector (docs/ALGORITHM.md §2)."""

import json
import shutil

import numpy as np
import pytest
import torch

from cpsample_fast.data import load_digits
from cpsample_fast.protector import (
    ProtectorNet,
    load_protector,
    save_protector,
    train_protector,
    verify_protector,
)
from cpsample_fast.protector.labels import dataset_fingerprint, draw_labels
from cpsample_fast.schedule import NoiseSchedule


def _train(label_seed=0, n=5, protector=None):
    return train_protector(
        load_digits(n, size=8),
        schedule=NoiseSchedule(),
        protector=protector or {"base_channels": 8},
        label_seed=label_seed,
        steps=3,
        batch_size=3,
        progress=False,
        report_bins=2,
    )


def test_save_load_round_trip_reproduces_logits_exactly(tmp_path):
    net, report = _train()
    path = save_protector(tmp_path / "p.safetensors", net, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.safetensors"]
    back, meta = load_protector(path)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 499, 999])
    err = (back(x, t) - net.eval()(x, t)).abs().max().item()
    print("round-trip logits max abs error", err)
    assert err == 0.0
    assert meta["labels"] == report.labels.tolist() and meta["label_seed"] == 0
    assert meta["fingerprint"] == report.fingerprint
    assert meta["schedule"] == NoiseSchedule().to_config()
    assert meta["architecture"]["config"] == net.config
    assert meta["report"]["member"] == report.member and "package_version" in meta
    assert verify_protector(meta, load_digits(5, size=8)).ok
    # A folder works as the path too.
    save_protector(tmp_path / "dir", net, report)
    assert load_protector(tmp_path / "dir")[1]["labels"] == meta["labels"]


def test_tampered_or_mismatched_sidecars_are_refused(tmp_path):
    net, report = _train(label_seed=0)
    other, other_report = _train(label_seed=1)
    a = save_protector(tmp_path / "a" / "p.safetensors", net, report)
    b = save_protector(tmp_path / "b" / "p.safetensors", other, other_report)

    # Flipping a label in the sidecar.
    side = a.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["labels"][0] = 1 - meta["labels"][0]
    side.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="modified"):
        load_protector(a)

    # A valid sidecar of other weights.
    shutil.copy(b.with_suffix(".json"), side)
    with pytest.raises(ValueError, match="do not match"):
        load_protector(a)

    # Modified weights.
    save_protector(a, net, report)
    raw = bytearray(a.read_bytes())
    raw[-1] ^= 0x01
    a.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="do not match"):
        load_protector(a)

    # Missing sidecar, missing weights, pickle files.
    b.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="sidecar"):
        load_protector(b)
    with pytest.raises(FileNotFoundError):
        load_protector(tmp_path / "none.safetensors")
    (tmp_path / "w.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        load_protector(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="pickle"):
        save_protector(tmp_path / "w.ckpt", net, report)


def test_custom_module_needs_an_instance_to_load_into(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 1)

        def forward(self, x, t):
            return self.lin(x.flatten(1))[:, 0] + 0 * t

    net, report = _train(protector=Tiny())
    path = save_protector(tmp_path / "c.safetensors", net, report)
    with pytest.raises(ValueError, match="custom protector"):
        load_protector(path)
    back, meta = load_protector(path, protector=Tiny())
    assert meta["architecture"]["class"].endswith("Tiny")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(back(x, torch.zeros(3)), net(x, torch.zeros(3)))


def test_unwritable_destination_leaves_nothing(tmp_path):
    net, report = _train()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a writable directory"):
        save_protector(blocker / "p.safetensors", net, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    with pytest.raises(TypeError, match="ProtectorReport"):
        save_protector(tmp_path / "p.safetensors", net, {"labels": []})


def test_fingerprint_ignores_loader_rounding_but_not_content():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(7, 3, 5, 5), dtype=np.uint8)
    a = torch.from_numpy(raw).float() / 127.5 - 1.0
    c = torch.from_numpy(raw).float() * (2.0 / 255.0) - 1.0
    b = (torch.from_numpy(raw).float() - 127.5) / 127.5
    diff = (a - b).abs().max().item()
    print("two loaders differ by up to", diff)
    assert diff > 0  # the float32 bytes differ ...
    assert (a - c).abs().max().item() > 0
    assert dataset_fingerprint(a) == dataset_fingerprint(b) == dataset_fingerprint(c)  # not this
    d16 = torch.from_numpy(load_digits(3, size=None).numpy().astype(np.float64) * 0.5 + 0.5)
    assert dataset_fingerprint((d16 * 2 - 1).float()) == dataset_fingerprint(load_digits(3, None))
    changed = a.clone()
    changed[3, 1, 2, 2] += 2.0 / 255.0
    assert dataset_fingerprint(changed)["sha256"] != dataset_fingerprint(a)["sha256"]
    assert dataset_fingerprint(a.flip(0))["sha256"] != dataset_fingerprint(a)["sha256"]


def test_verify_protector_detects_another_dataset():
    x = load_digits(6, size=8)
    meta = {"fingerprint": dataset_fingerprint(x)}
    assert verify_protector(meta, x)
    with pytest.raises(ValueError, match="different dataset"):
        verify_protector(meta, load_digits(6, size=8, offset=6))
    res = verify_protector(meta, x[:5], strict=False)
    print(res.reasons)
    assert not res and "count" in res.reasons[0]
    assert not verify_protector(meta, x[[1, 0, 2, 3, 4, 5]], strict=False)
    assert not verify_protector(meta, load_digits(6, size=16), strict=False)
    with pytest.raises(ValueError, match="fingerprint"):
        verify_protector({}, x)


def test_labels_are_fair_coins_from_the_seed():
    y = draw_labels(4001, 7)
    assert torch.equal(y, draw_labels(4001, 7)) and not torch.equal(y, draw_labels(4001, 8))
    frac = y.float().mean().item()
    print("fraction of ones", frac)
    assert set(y.unique().tolist()) == {0, 1} and abs(frac - 0.5) < 0.03  # 4σ for n = 4001
    with pytest.raises(ValueError):
        draw_labels(0, 1)
    assert isinstance(ProtectorNet(1, 8), torch.nn.Module)
