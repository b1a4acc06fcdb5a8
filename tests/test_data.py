"""Loaders and the shared image check (cpsample_fast/data.py)."""

import numpy as np
import pytest
import torch

from cpsample_fast.data import (
    as_image_tensor,
    check_images,
    load_digits,
    load_image_folder,
    load_lfw_subset,
    load_npz,
    normalize_images,
)


def test_digits_shapes_ranges_and_offsets():
    a = load_digits(5, size=16)
    b = load_digits(3, size=16, offset=2)
    raw = load_digits(7, size=None)
    print("digits range", a.min().item(), a.max().item())
    assert a.shape == (5, 1, 16, 16) and a.dtype == torch.float32
    assert raw.shape == (7, 1, 8, 8)
    assert a.min() >= -1 and a.max() <= 1 and raw.min() == -1 and raw.max() == 1
    assert torch.equal(a[2:], b)  # offsets select disjoint, aligned slices
    with pytest.raises(ValueError, match="1797 images"):
        load_digits(10, offset=1790)


def test_lfw_subset_faces():
    x = load_lfw_subset(9, size=None)
    assert x.shape == (9, 1, 25, 25) and x.min() >= -1 and x.max() <= 1
    assert load_lfw_subset(2, size=16).shape == (2, 1, 16, 16)


def test_npz_uint8_channels_last_and_normalize(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=arr)
    x = load_npz(tmp_path / "d.npz")
    ref = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    err = (x - ref).abs().max().item()
    print("npz max abs error", err)
    assert x.shape == (5, 3, 6, 6) and err == 0.0
    np.savez(tmp_path / "f.npz", x=rng.normal(size=(3, 1, 4, 4)).astype(np.float32) * 5)
    with pytest.raises(ValueError, match="--normalize"):
        load_npz(tmp_path / "f.npz")
    y = load_npz(tmp_path / "f.npz", normalize=True)
    assert y.min() == -1 and y.max() == 1
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "nope.npz")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    (tmp_path / "notes.txt").write_text("ignored")
    x = load_image_folder(tmp_path, size=8)
    assert x.shape == (3, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    g = load_image_folder(tmp_path, mode="L", n=2, offset=1)
    assert g.shape == (2, 1, 10, 12)
    with pytest.raises(FileNotFoundError, match="no image folder"):
        load_image_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(empty)


def test_check_images_rejects_bad_input():
    good = torch.zeros(3, 1, 4, 4)
    assert check_images(good).dtype == torch.float32
    with pytest.raises(ValueError, match="empty"):
        check_images(torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        check_images(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="normalize"):
        check_images(good + 3)
    bad = good.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_images(bad)
    with pytest.raises(TypeError, match="floating"):
        check_images(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError):
        check_images([[0.0]])
    with pytest.raises(ValueError, match="NaN"):
        normalize_images(bad)


def test_dataset_input_is_stacked():
    x = load_digits(3, size=8)
    ds = [(x[i], i) for i in range(3)]  # (image, label) items, like torchvision
    assert torch.equal(as_image_tensor(ds), x)
    with pytest.raises(ValueError, match="empty"):
        as_image_tensor([])
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        as_image_tensor([torch.zeros(4, 4)])
