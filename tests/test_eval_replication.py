"""Replication: exact chunked nearest-neighbour search, rates, Carlini's ratio, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from cpsample_fast.eval import nearest_neighbours, replication, save_pairs_grid
from cpsample_fast.eval.replication import _faiss_available


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_chunked_search_matches_brute_force(metric):
    torch.manual_seed(0)
    q, k = torch.randn(13, 7), torch.randn(29, 7)
    v, i = nearest_neighbours(q, k, 5, metric=metric, chunk_size=4, backend="torch")
    if metric == "cosine":
        full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(k, dim=1).T
        wv, wi = full.topk(5, dim=1)
    else:
        wv, wi = torch.cdist(q, k).topk(5, dim=1, largest=False)
    err = (v - wv).abs().max().item()
    print(metric, "max error vs brute force:", err)
    assert err < 1e-5
    assert torch.equal(i, wi)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_memory_stays_chunked(metric):
    """No temporary may grow like N × k × D (the old exact ℓ2 recompute did)."""
    torch.manual_seed(0)
    n, m, d, k = 201, 31, 16, 5  # odd query count: the last chunk is short
    q, keys = torch.randn(n, d), torch.randn(m, d)
    with _LargestTensor() as mode:
        v, i = nearest_neighbours(q, keys, k, metric=metric, chunk_size=8, backend="torch")
    bound = max(n * d, m * d)  # the inputs themselves
    print(metric, "largest temporary:", mode.largest, "elements; inputs:", bound)
    assert mode.largest <= bound < n * k * d
    if metric == "l2":
        wv, wi = torch.cdist(q.double(), keys.double()).topk(k, dim=1, largest=False)
    else:
        full = (
            torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
        )
        wv, wi = full.double().topk(k, dim=1)
    err = (v.double() - wv).abs().max().item()
    print(metric, "max error vs brute force:", err)
    assert err < 1e-5 and torch.equal(i, wi)


@pytest.mark.skipif(not _faiss_available(), reason="faiss not installed")
def test_faiss_matches_torch():
    torch.manual_seed(0)
    q, k = torch.randn(11, 6), torch.randn(40, 6)
    for metric in ("cosine", "l2"):
        v1, i1 = nearest_neighbours(q, k, 3, metric=metric, backend="torch")
        v2, i2 = nearest_neighbours(q, k, 3, metric=metric, backend="faiss")
        assert torch.equal(i1, i2) and (v1 - v2).abs().max() < 1e-4


def test_copies_are_flagged_and_novel_images_are_not():
    torch.manual_seed(0)
    train = torch.rand(20, 1, 6, 6) * 2 - 1
    copies = train[[3, 7, 11]] + 0.01 * torch.randn(3, 1, 6, 6)
    novel = torch.rand(4, 1, 6, 6) * 2 - 1
    r = replication(torch.cat([copies, novel]), train, thresholds=(0.99, 0.5), carlini_n=10)
    print("similarities", r.similarity, "ratios", r.l2_ratio)
    assert torch.equal(r.nearest_index[:3], torch.tensor([3, 7, 11]))
    assert r.rates[0.99] == pytest.approx(3 / 7)
    assert (r.similarity[:3] > 0.99).all() and (r.similarity[3:] < 0.99).all()
    assert (r.l2_ratio[:3] < 0.1).all() and (r.l2_ratio[3:] > 1 / 3).all()
    assert r.carlini_rate == pytest.approx(3 / 7)
    d = r.to_dict()
    assert d["features"] == "pixels" and sum(d["similarity_histogram"]["counts"]) == 7
    assert r.rate(0.99) == r.rates[0.99]


def test_feature_extractor_module_and_numpy_input():
    torch.manual_seed(0)
    train = torch.rand(9, 3, 4, 4)
    proj = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    r = replication(train[:3].numpy(), train, features=proj)
    err = (r.similarity - 1).abs().max().item()
    print("self-similarity error:", err)
    assert err < 1e-5 and torch.equal(r.nearest_index, torch.arange(3))
    assert r.features == "Sequential"


def test_pairs_grid_png(tmp_path):
    torch.manual_seed(0)
    train = torch.rand(5, 1, 8, 8) * 2 - 1
    gen = train[[0, 2, 4]] + 0.05 * torch.randn(3, 1, 8, 8)
    r = replication(gen, train)
    save_pairs_grid(gen, train, r, tmp_path / "pairs.png", n=3)
    img = Image.open(tmp_path / "pairs.png")
    assert img.size[0] > 50 and img.size[1] > 50


def test_bad_input():
    train = torch.rand(4, 1, 4, 4)
    with pytest.raises(ValueError, match="same image shape"):
        replication(torch.rand(2, 1, 4, 5), train)
    with pytest.raises(ValueError, match="generated is empty"):
        replication(torch.rand(0, 1, 4, 4), train)
    with pytest.raises(ValueError, match="training is empty"):
        replication(torch.rand(2, 1, 4, 4), np.zeros((0, 1, 4, 4), np.float32))
    nan = torch.rand(3, 1, 4, 4)
    nan[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"generated contains NaN.*\[1\]"):
        replication(nan, train)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        replication(train, train, thresholds=(1.5,))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        replication(train, train, thresholds=(float("nan"),))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        replication(train, train, features=lambda x: x)  # returns [B, C, H, W]
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        replication(train, train, features=lambda x: x.flatten(1)[:1])  # wrong batch
    with pytest.raises(ValueError, match="features must be"):
        replication(train, train, features="dino")
    with pytest.raises(TypeError, match="tensor or numpy"):
        replication([1, 2], train)


def test_gaussian_blur_against_explicit_kernel():
    from cpsample_fast.eval import gaussian_blur

    torch.manual_seed(0)
    x = torch.rand(3, 2, 9, 11)
    sigma = 1.0
    got = gaussian_blur(x, sigma)
    # Independent form: the 2-D kernel as an outer product, reflect padding, one dense conv.
    r = 3
    o = np.arange(-r, r + 1)
    k1 = np.exp(-0.5 * (o / sigma) ** 2)
    k1 /= k1.sum()
    k2 = np.outer(k1, k1)
    xp = np.pad(x.double().numpy(), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    want = np.zeros(x.shape)
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            want[:, :, i, j] = (xp[:, :, i : i + 2 * r + 1, j : j + 2 * r + 1] * k2).sum((2, 3))
    err = np.abs(got.double().numpy() - want).max()
    print("max error vs explicit 2-D kernel:", err)
    assert err < 1e-6
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 4, 4), 0.3), 2.0), torch.tensor(0.3))
    assert torch.equal(gaussian_blur(x, 0.0), x)
    with pytest.raises(ValueError, match="blur sigma"):
        gaussian_blur(x, -1.0)


def test_blurred_replication_catches_speckled_copies():
    """A member plus strong speckle escapes the plain pixel-cosine audit but not the blurred
    one; a genuinely different image is flagged by neither."""
    from cpsample_fast.eval import blurred_replication

    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    members = torch.stack(
        [torch.sin(xx / (2 + k) + k) * torch.cos(yy / (3 + k)) for k in range(6)]
    )[:, None]
    speckled = members[:3] + 0.6 * torch.randn(3, 1, 16, 16)
    novel = torch.stack([torch.cos(xx / 1.3 + yy / 2.1 + k) for k in range(3)])[:, None]
    gen = torch.cat([speckled, novel])
    plain = replication(gen, members, thresholds=(0.9,))
    blurred = blurred_replication(gen, members, sigma=1.0, thresholds=(0.9,))
    print("plain", plain.similarity, "blurred", blurred.similarity)
    assert (plain.similarity[:3] < 0.9).all()
    assert (blurred.similarity[:3] > 0.9).all()
    assert (blurred.similarity[3:] < 0.9).all()
    assert blurred.rates[0.9] == 0.5 and plain.rates[0.9] == 0.0
    assert blurred.params["blur_sigma"] == 1.0 and "blur sigma=1 px" in blurred.features
    assert blurred.nearest_index[:3].tolist() == [0, 1, 2]
