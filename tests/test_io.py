"""Atomic safetensors / JSON helpers and the pickle refusal (cpsample_fast/io.py)."""

import os

import pytest
import torch

from cpsample_fast.io import (
    atomic_path,
    ensure_writable_dir,
    load_safetensors,
    read_json,
    refuse_pickle,
    safetensors_metadata,
    save_safetensors_atomic,
    write_json_atomic,
)


def test_safetensors_round_trip_is_exact(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=gen),  # odd shape
        "step": torch.tensor(7.0),  # 0-dim, as AdamW keeps it
        "rng": torch.randint(0, 255, (17,), generator=gen, dtype=torch.uint8),
    }
    base = torch.arange(6.0)
    tensors["view"] = base[1:4]  # a view of shared storage: must be cloned, not refused
    path = save_safetensors_atomic(tmp_path / "a.safetensors", tensors, metadata={"k": "v"})
    back = load_safetensors(path)
    for k, v in tensors.items():
        err = (back[k].double() - v.double()).abs().max().item()
        print(k, "max abs error", err)
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and err == 0.0
    assert safetensors_metadata(path) == {"k": "v"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left


def test_json_round_trip_and_errors(tmp_path):
    obj = {"b": [1, 2.5, None], "a": "é"}
    p = write_json_atomic(tmp_path / "x.json", obj)
    assert read_json(p) == obj
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")
    with pytest.raises(ValueError):  # NaN is not JSON; nothing half-written
        write_json_atomic(tmp_path / "nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["bad.json", "x.json"]


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin", ".pkl"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        refuse_pickle(path)
    with pytest.raises(ValueError, match="safetensors"):
        load_safetensors(path)
    with pytest.raises(ValueError, match="pickle"):
        save_safetensors_atomic(path, {"w": torch.zeros(1)})


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_unwritable_directory_is_reported(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a writable directory"):
        ensure_writable_dir(blocker / "sub", "checkpoint_dir")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ValueError, match="not a writable directory"):
                ensure_writable_dir(ro, "checkpoint_dir")
        finally:
            ro.chmod(0o700)


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """mkstemp's 0600 must not leak into results other users need to read."""
    import os

    from cpsample_fast.io import write_json_atomic

    mask = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "r.json", {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)
