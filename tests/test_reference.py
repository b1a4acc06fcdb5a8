"""The reference loop against a hand-computed loop with closed-form models (docs/ALGORITHM.md §3).

The protector is linear per sample, ``f(x_b) = <w, x_b> + bias``, so ``∇_x f = w`` and every
mode's guidance term can be written down without autograd; the eps-model is linear too. The
hand loop is float64 NumPy, written from docs/ALGORITHM.md §3 directly, so a wrong sign, a wrong
factor or a
wrong gate in the reference shows up as a large relative error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpsample_fast.reference import reference_sample
from cpsample_fast.schedule import NoiseSchedule

SHAPE = (3, 2, 3, 5)  # odd batch, non-power-of-two sizes


class LinearProtector(torch.nn.Module):
    """``f(x_b, t) = <w, x_b> + bias`` (time-independent)."""

    def __init__(self, w: torch.Tensor, bias: float | torch.Tensor):  # bias: scalar or [B]
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.bias = bias

    def forward(self, x, t):
        return (x * self.w.to(x.dtype)).flatten(1).sum(1) + self.bias


class LinearEps(torch.nn.Module):
    """``eps(x, t) = a·x + b·t/T`` — enough structure to make every step different."""

    def forward(self, x, t):
        return 0.3 * x + 0.05 * (t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def hand_loop(schedule, x_T, z, n, eta, scale, alpha, mode, w, bias):
    """docs/ALGORITHM.md §3 steps 1-7 in float64 NumPy with the closed-form gradient ``∇f = w``."""
    ac = schedule.alphas_cumprod.double().numpy()
    final = float(schedule.final_alpha_cumprod)
    T = schedule.num_train_timesteps
    x = x_T.double().numpy().copy()
    w = w.double().numpy()
    B = x.shape[0]
    for k, t in enumerate(schedule.timesteps(n).tolist()):
        tp = t - T // n
        a, ap = ac[t], (ac[tp] if tp >= 0 else final)
        eps = 0.3 * x + 0.05 * t / 1000.0
        eps_model = eps
        if scale > 0:
            f = (x * w).reshape(B, -1).sum(1) + bias  # [B]
            r = _sigmoid(f)
            q = np.maximum(r, 1 - r)
            weight = {"repel": 1 - q, "attract": q, "entropy": np.abs(f) * r * (1 - r)}[mode]
            m = np.minimum(r, 1 - r) < alpha
            coef = scale * math.sqrt(1 - a) * m * weight * np.sign(f)  # [B]
            eps = eps + coef.reshape(B, 1, 1, 1) * w
        # the model's x̂0, clipped as diffusers does; then the guidance moves x̂0 with ε̂
        x0 = (x - math.sqrt(1 - a) * eps_model) / math.sqrt(a)
        if schedule.clip_sample:
            x0 = np.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
        x0 = x0 - math.sqrt((1 - a) / a) * (eps - eps_model)
        var = (1 - ap) / (1 - a) * (1 - a / ap)
        sigma = eta * math.sqrt(var)
        x = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps
        if eta > 0:
            x = x + sigma * z[k].double().numpy()
    return x


def _inputs(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(SHAPE, generator=g)
    z = torch.randn((n, *SHAPE), generator=g)
    w = torch.randn(SHAPE[1:], generator=g) * 0.05
    return x_T, z, w


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("mode", ["repel", "attract", "entropy"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip", [False, True])
def test_reference_matches_hand_computed_loop(mode, eta, clip):
    n = 6
    schedule = NoiseSchedule(clip_sample=clip, clip_sample_range=1.5)
    x_T, z, w = _inputs(n=n)
    # per-sample bias: ±4 → min(r, 1-r) ≈ 0.018 < α = 0.1, guided; 1 → ≈ 0.27, never guided
    # (<w, x> stays within ~±1): a reference that ignored the gate would not match
    bias = np.array([4.0, 1.0, -4.0])
    kw = dict(num_inference_steps=n, eta=eta, scale=30.0, alpha=0.1, mode=mode)
    expect = hand_loop(schedule, x_T, z, n, eta, 30.0, 0.1, mode, w, bias)
    prot = LinearProtector(w, torch.tensor(bias, dtype=torch.float32))
    _, trace = reference_sample(LinearEps(), prot, schedule, SHAPE, noise=x_T, step_noise=z,
                                return_trace=True, **kw)  # fmt: skip
    print("gate per step", trace.gate.int().tolist())
    assert (trace.gate.any(1) & ~trace.gate.all(1)).any()  # some steps partly open
    for dtype, tol in [(torch.float64, 1e-11), (torch.float32, 1e-5)]:
        out = reference_sample(  # each model is fed its own dtype: make the protector match
            LinearEps(),
            prot.to(dtype),
            schedule,
            SHAPE,
            noise=x_T,
            step_noise=z,
            dtype=dtype,
            **kw,
        )
        err = _rel(out, expect)
        print(f"{mode} eta={eta} clip={clip} {dtype}: max rel err {err:.2e}")
        assert out.dtype == dtype
        assert err < tol
    # the guidance really acted: plain DDIM lands elsewhere
    plain = hand_loop(schedule, x_T, z, n, eta, 0.0, 0.1, mode, w, bias)
    assert _rel(plain, expect) > 1e-3


def test_gate_both_sides_of_alpha():
    """min(r, 1-r) just above α: exactly plain DDIM; just below: guided."""
    n = 5
    schedule = NoiseSchedule(clip_sample=False)
    x_T, z, w = _inputs(n=n)
    w = w * 1e-4  # logits stay within ~1e-3 of the bias
    bias = 3.0
    small_side = 1.0 / (1.0 + math.exp(bias))  # min(r, 1-r) at f = bias
    common = dict(num_inference_steps=n, scale=50.0, mode="repel", noise=x_T)
    plain = reference_sample(LinearEps(), None, schedule, SHAPE, num_inference_steps=n, noise=x_T)
    off = reference_sample(
        LinearEps(), LinearProtector(w, bias), schedule, SHAPE, alpha=small_side * 0.9, **common
    )
    on, trace = reference_sample(
        LinearEps(),
        LinearProtector(w, bias),
        schedule,
        SHAPE,
        alpha=small_side * 1.1,
        return_trace=True,
        **common,
    )
    print("gate off/on diff", (off - plain).abs().max().item(), (on - plain).abs().max().item())
    assert torch.equal(off, plain)
    assert (on - plain).abs().max() > 1e-4
    assert trace.gate.all()
    expect = hand_loop(schedule, x_T, z, n, 0.0, 50.0, small_side * 1.1, "repel", w, bias)
    assert _rel(on, expect) < 1e-5


def test_scale_zero_and_no_protector_are_plain_ddim():
    n = 7
    schedule = NoiseSchedule()
    x_T, z, w = _inputs(n=n)
    plain = hand_loop(schedule, x_T, z, n, 0.5, 0.0, 0.1, "repel", w, 4.0)
    for prot, scale in [(None, 10.0), (LinearProtector(w, 4.0), 0.0)]:
        out = reference_sample(
            LinearEps(),
            prot,
            schedule,
            SHAPE,
            num_inference_steps=n,
            eta=0.5,
            scale=scale,
            alpha=0.5,
            noise=x_T,
            step_noise=z,
        )
        assert _rel(out, plain) < 1e-5


def test_protector_without_scale_or_alpha_is_refused():
    """A protector passed without scale/alpha must not silently sample unprotected."""
    prot = LinearProtector(torch.zeros(SHAPE[1:]), 4.0)
    for kw in ({}, {"scale": 1000.0}, {"alpha": 0.001}):
        with pytest.raises(TypeError, match="must be given with a protector"):
            reference_sample(LinearEps(), prot, NoiseSchedule(), SHAPE, num_inference_steps=2, **kw)


@pytest.mark.parametrize("mode", ["repel", "attract", "entropy"])
def test_sign_pushes_logits_towards_the_boundary(mode):
    """One step at t = 0 with ε = 0: guidance must lower |f| (a sign error would raise it)."""
    schedule = NoiseSchedule(clip_sample=False)
    assert schedule.timesteps(1).tolist() == [0]
    x_T, _, w = _inputs()
    w = w / w.norm()
    zero_eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for bias in (3.0, -3.0):
        prot = LinearProtector(w, bias)
        kw = dict(num_inference_steps=1, alpha=0.5, mode=mode, noise=x_T)
        plain = reference_sample(zero_eps, prot, schedule, SHAPE, scale=0.0, **kw)
        guided = reference_sample(zero_eps, prot, schedule, SHAPE, scale=1000.0, **kw)
        with torch.no_grad():
            f_plain, f_guided = prot(plain, None).abs(), prot(guided, None).abs()
        print(mode, bias, (f_plain - f_guided).tolist())
        assert (f_guided < f_plain).all()


def test_seeded_noise_is_reproducible_and_batch_invariant():
    schedule = NoiseSchedule()
    kw = dict(num_inference_steps=4, eta=1.0, seed=123)
    a = reference_sample(LinearEps(), None, schedule, (5, 1, 4, 4), **kw)
    b = reference_sample(LinearEps(), None, schedule, (5, 1, 4, 4), **kw)
    assert torch.equal(a, b)
    # sample 3 drawn alone (offset 3) equals sample 3 of the batch
    c = reference_sample(LinearEps(), None, schedule, (1, 1, 4, 4), sample_offset=3, **kw)
    assert torch.allclose(c[0], a[3], atol=1e-6)
    d = reference_sample(LinearEps(), None, schedule, (5, 1, 4, 4), **{**kw, "seed": 124})
    assert not torch.allclose(a, d)


class NaNAt(torch.nn.Module):
    def __init__(self, t_bad):
        super().__init__()
        self.t_bad = t_bad

    def forward(self, x, t):
        out = 0.1 * x
        return torch.where(t.view(-1, 1, 1, 1) == self.t_bad, torch.nan, out)


def test_bad_input_errors():
    s = NoiseSchedule()
    eps = LinearEps()
    shape = (2, 1, 4, 4)
    with pytest.raises(ValueError, match="alpha"):
        reference_sample(eps, None, s, shape, num_inference_steps=4, alpha=0.6)
    with pytest.raises(ValueError, match="alpha"):
        reference_sample(eps, None, s, shape, num_inference_steps=4, alpha=0.0)
    with pytest.raises(ValueError, match="scale"):
        reference_sample(eps, None, s, shape, num_inference_steps=4, scale=-1.0)
    with pytest.raises(ValueError, match="eta"):
        reference_sample(eps, None, s, shape, num_inference_steps=4, eta=-0.1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        reference_sample(eps, None, s, shape, num_inference_steps=1001)
    with pytest.raises(ValueError, match="mode"):
        reference_sample(eps, None, s, shape, num_inference_steps=4, mode="push")
    with pytest.raises(ValueError, match="noise must have shape"):
        reference_sample(eps, None, s, shape, num_inference_steps=4, noise=torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="step_noise"):
        bad = torch.zeros(3, *shape)
        reference_sample(eps, None, s, shape, num_inference_steps=4, eta=1.0, step_noise=bad)
    with pytest.raises(ValueError, match="eps_model returned shape"):
        reference_sample(lambda x, t: x[:, :1, :2], None, s, shape, num_inference_steps=4)
    with pytest.raises(TypeError, match="floating-point"):
        reference_sample(lambda x, t: x.long(), None, s, shape, num_inference_steps=4)
    with pytest.raises(ValueError, match="protector must return logits"):
        reference_sample(
            eps, lambda x, t: x.flatten(1), s, shape, num_inference_steps=4, scale=1.0, alpha=0.1
        )
    t_bad = int(s.timesteps(4)[2])
    msg = f"eps_model produced NaN/inf at step 2 \\(t={t_bad}\\)"
    with pytest.raises(FloatingPointError, match=msg):
        reference_sample(NaNAt(t_bad), None, s, shape, num_inference_steps=4)
    nan_prot = lambda x, t: torch.where(t == t_bad, torch.nan, 1.0) + 0 * x.flatten(1).sum(1)  # noqa: E731
    with pytest.raises(FloatingPointError, match="protector produced NaN/inf at step 2"):
        reference_sample(eps, nan_prot, s, shape, num_inference_steps=4, scale=1.0, alpha=0.1)
