"""EmpiricalDenoiser: the exact optimal denoiser of a finite set, checked against brute force."""

import pytest
import torch

from cpsample_fast.models import EmpiricalDenoiser
from cpsample_fast.reference import reference_sample
from cpsample_fast.schedule import NoiseSchedule


def brute_force_eps(images, ac, x, t):
    """ε* from the softmax posterior written out directly, in float64."""
    x64, im = x.double().flatten(1), images.double().flatten(1)
    a = ac.double()[t][:, None]
    logits = -((x64[:, None] - a[:, :, None].sqrt() * im[None]) ** 2).sum(2) / (2 * (1 - a))
    w = torch.softmax(logits, dim=1)
    x0 = w @ im
    return ((x64 - a.sqrt() * x0) / (1 - a).sqrt()).reshape(x.shape)


@pytest.mark.parametrize("chunk_size", [3, 4096])
def test_matches_brute_force(chunk_size):
    torch.manual_seed(0)
    s = NoiseSchedule()
    images = torch.rand(7, 1, 5, 3) * 2 - 1  # odd sizes
    model = EmpiricalDenoiser(images, s, chunk_size=chunk_size)
    t = torch.tensor([0, 10, 500, 999, 250])
    x = torch.randn(5, 1, 5, 3)
    got = model(x, t).double()
    want = brute_force_eps(images, s.alphas_cumprod, x, t)
    err = (got - want).abs().max().item()
    print("max abs error vs brute force:", err)
    assert err < 1e-4


def test_ddim_reproduces_training_images():
    s = NoiseSchedule()
    torch.manual_seed(1)
    images = torch.rand(6, 1, 4, 4) * 2 - 1
    model = EmpiricalDenoiser(images, s)
    out = reference_sample(model, None, s, (3, 1, 4, 4), num_inference_steps=20, seed=3)
    d = torch.cdist(out.flatten(1), images.flatten(1)).min(1).values
    print("distance to nearest training image:", d)
    assert (d < 1e-2).all()


def test_bad_input():
    s = NoiseSchedule()
    with pytest.raises(ValueError, match="non-empty"):
        EmpiricalDenoiser(torch.zeros(0, 1, 4, 4), s)
    with pytest.raises(ValueError, match="NaN"):
        EmpiricalDenoiser(torch.full((2, 1, 4, 4), float("nan")), s)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        EmpiricalDenoiser(torch.zeros(2, 1, 4, 4), "linear")
    model = EmpiricalDenoiser(torch.zeros(2, 1, 4, 4), s)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.zeros(3, 1, 4, 5), torch.zeros(3, dtype=torch.long))
