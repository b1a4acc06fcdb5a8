"""Quality: Fréchet distance against scipy's sqrtm, KID, the feature spaces, missing weights."""

import numpy as np
import pytest
import scipy.linalg
import torch

from cpsample_fast.eval import frechet_distance, kernel_inception_distance, quality
from cpsample_fast.eval.quality import train_feature_net


def test_frechet_matches_scipy():
    torch.manual_seed(0)
    a = torch.randn(50, 5) @ torch.randn(5, 5)
    b = torch.randn(37, 5) @ torch.randn(5, 5) + 0.5
    an, bn = a.double().numpy(), b.double().numpy()
    ca, cb = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    want = ((an.mean(0) - bn.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * covmean)
    got = frechet_distance(a, b)
    print("FD", got, "scipy", want)
    assert got == pytest.approx(want, rel=1e-6)
    assert frechet_distance(a, a) < 1e-6
    shift = frechet_distance(a, a + torch.tensor([1.0, 2.0, 0, 0, 0]))
    assert shift == pytest.approx(5.0, rel=1e-6)


def test_kid():
    torch.manual_seed(0)
    a, b = torch.randn(60, 4), torch.randn(60, 4)
    same, _ = kernel_inception_distance(a, b, n_subsets=10, subset_size=40)
    far, _ = kernel_inception_distance(a, b + 2, n_subsets=10, subset_size=40)
    print("KID same", same, "shifted", far)
    assert abs(same) < 0.1 < far


def test_quality_trained_features_and_naming():
    torch.manual_seed(0)
    ref = torch.rand(33, 1, 8, 8) * 2 - 1
    net = train_feature_net(ref, dim=8, steps=5)
    net2 = train_feature_net(ref, dim=8, steps=5)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(net(x), net2(x))  # deterministic given the seed
    good = quality(ref[:16] + 0.01, ref[16:], features=net)
    bad = quality(torch.rand(17, 1, 8, 8) * 0.2, ref[16:], features=net)
    print(good, bad)
    assert "trained here" in good.feature_space and "not comparable" in good.feature_space
    assert good.frechet_distance < bad.frechet_distance
    assert quality(ref[:5], ref[5:], features="pixels").feature_space == "pixels"


def test_missing_inception_weights(tmp_path):
    ref = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match="weights-inception-2015-12-05"):
        quality(ref, ref, features="inception")
    with pytest.raises(FileNotFoundError, match="not found.*torch-fidelity"):
        quality(ref, ref, features="inception", inception_weights=tmp_path / "nope.pth")


def test_bad_input():
    ref = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="share the image shape"):
        quality(torch.rand(4, 3, 8, 8), ref, features="pixels")
    with pytest.raises(ValueError, match="generated is empty"):
        quality(torch.rand(0, 1, 8, 8), ref)
    with pytest.raises(ValueError, match="at least 2"):
        quality(ref[:1], ref, features="pixels")
    with pytest.raises(ValueError, match="features must be"):
        quality(ref, ref, features="clip")
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        quality(ref, ref, features=lambda x: x.mean())
