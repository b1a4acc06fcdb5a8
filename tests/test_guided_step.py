"""One guided DDIM step of the reference against its closed form (docs/ALGORITHM.md §3).

With a zero eps-model and a linear protector ``f(x_b) = <w, x_b> + bias_b`` (so ``∇f = w``),
one step from ``x_t`` is ``x' = sp·x̂0 + d·ε̂`` with ``ε̂ = G``, ``x̂0 = (x - s1·G)/sa``, hence

    x' - x'_unguided = -(sp·s1/sa - d)·G,   G = s·s1·m·w(f)·sign(f)·w.

The step is taken at t = 900 → 800, where the direction coefficient ``d = √(1 - ᾱ')`` is far
from 0, so the ε̂ term matters: flipping its sign gives ``-(sp·s1/sa + d)·G`` instead (the step
at t = 0 of tests/test_reference.py has d = 0 and cannot tell). ``(sp·s1/sa - d) > 0`` is why
every mode lowers |f|.
"""

from __future__ import annotations

import math

import pytest
import torch

from cpsample_fast.reference import reference_sample
from cpsample_fast.schedule import NoiseSchedule

SHAPE = (3, 2, 3, 5)
N_STEPS = 10  # leading spacing: 900, 800, ..., 0


class LinearProtector(torch.nn.Module):
    def __init__(self, w, bias):
        super().__init__()
        self.w, self.bias = w, bias

    def forward(self, x, t):
        return (x * self.w.to(x.dtype)).flatten(1).sum(1) + self.bias.to(x.dtype)


def _first_step(prot, schedule, x_T, **kw):
    """x after step 0 of reference_sample (float64), through its callback."""
    seen = {}

    def keep(k, t, x):
        if k == 0:
            seen["t"], seen["x"] = t, x.clone()

    reference_sample(lambda x, t: torch.zeros_like(x), prot, schedule, SHAPE,
                     num_inference_steps=N_STEPS, noise=x_T, dtype=torch.float64, callback=keep,
                     **kw)  # fmt: skip
    return seen["t"], seen["x"]


@pytest.mark.parametrize("mode", ["repel", "attract", "entropy"])
def test_one_guided_step_moves_x_by_the_closed_form(mode):
    schedule = NoiseSchedule(clip_sample=False)
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    w = torch.randn(SHAPE[1:], generator=gen, dtype=torch.float64)
    w = w / w.norm()
    # logits 5, 0.5 and -5 at x_T: samples 0 and 2 gated at α = 0.1, sample 1 not
    target = torch.tensor([5.0, 0.5, -5.0], dtype=torch.float64)
    bias = target - (x_T * w).flatten(1).sum(1)
    prot = LinearProtector(w, bias)
    scale, alpha = 20.0, 0.1
    t, plain = _first_step(prot, schedule, x_T, scale=0.0, alpha=alpha, mode=mode)
    _, guided = _first_step(prot, schedule, x_T, scale=scale, alpha=alpha, mode=mode)

    ac = schedule.alphas_cumprod.double()
    t_prev = t - schedule.num_train_timesteps // N_STEPS
    sa, s1 = math.sqrt(ac[t]), math.sqrt(1 - ac[t])
    sp, d = math.sqrt(ac[t_prev]), math.sqrt(1 - ac[t_prev])
    print(f"t={t}→{t_prev}: sp·s1/sa = {sp * s1 / sa:.4f}, d = {d:.4f}")
    assert d > 0.3 * (sp * s1 / sa)  # the ε̂ term is a large part of the guided move

    f = (x_T * w).flatten(1).sum(1) + bias  # [B]
    r = torch.sigmoid(f)
    small = torch.sigmoid(-f.abs())
    weight = {"repel": small, "attract": 1 - small, "entropy": f.abs() * r * (1 - r)}[mode]
    m = small < alpha
    assert m.tolist() == [True, False, True]
    G = (scale * s1 * m * weight * torch.sign(f)).view(-1, 1, 1, 1) * w  # [B, C, H, W]
    expect = -(sp * s1 / sa - d) * G
    err = ((guided - plain) - expect).abs().max().item()
    print(f"{mode}: max |Δx - closed form| {err:.2e} (|Δx| up to {expect.abs().max():.2e})")
    # float64 throughout; the guided and plain runs each carry ~1e-9 of rounding in x
    assert err <= 1e-6 * expect.abs().max().item()
    assert torch.equal(guided[1], plain[1])  # the gate kept sample 1 unguided
    # and the move goes toward the boundary f = 0 for every guided sample (attract at s = 20
    # may overshoot it, so the sign of the move is checked, not |f|)
    f_plain = (plain * w).flatten(1).sum(1) + bias
    f_guided = (guided * w).flatten(1).sum(1) + bias
    assert (torch.sign(f) * (f_guided - f_plain) < 0)[m].all()
