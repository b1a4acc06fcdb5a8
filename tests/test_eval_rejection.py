"""Rejection-sampling baseline: equals plain DDIM when it accepts all, matches a known copy
fraction, reports a spent budget, refuses bad input."""

import math

import pytest
import torch

from cpsample_fast import reference_sample
from cpsample_fast.eval import rejection_sample
from cpsample_fast.schedule import NoiseSchedule

SHAPE = (1, 4, 4)


class TwoTemplateModel(torch.nn.Module):
    """An ε-model whose DDIM (η = 0) endpoint is template A when the initial noise's pixel 0
    exceeds ``tau``, else template B; both templates have pixel 0 = 0.

    Its x̂0 prediction is A or B by the sign of ``x_t[0] / √(1-ᾱ_t) - tau``; with x̂0[0] = 0 the
    DDIM step keeps ``x_t[0] / √(1-ᾱ_t)`` constant (the direction coefficient equals √(1-ᾱ')
    at η = 0), so the choice made at x_T holds to the end, and the last step returns x̂0.
    A fraction ``1 - Φ(tau)`` of samples are copies of A.
    """

    def __init__(self, a, b, schedule, tau):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.register_buffer("ac", schedule.alphas_cumprod.clone())
        self.tau = tau
        self.image_shape = tuple(a.shape)

    def forward(self, x, t):
        ac = self.ac[t][:, None, None, None]
        s1, sa = (1 - ac).sqrt(), ac.sqrt()
        pick = (x[:, :1, :1, :1] / s1 > self.tau).float()
        x0 = pick * self.a + (1 - pick) * self.b
        return (x - sa * x0) / s1


class TemplateProtector(torch.nn.Module):
    """Logit ``γ · <x - B, A - B> / |A - B|²``: 0 (unsure) at B, γ (confident) at A."""

    def __init__(self, a, b, gamma=20.0):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.gamma = gamma

    def forward(self, x, t):
        d = (self.a - self.b).flatten()
        return self.gamma * ((x - self.b).flatten(1) @ d) / d.dot(d)


def _templates():
    a = torch.linspace(-0.8, 0.9, 16).reshape(SHAPE)
    b = torch.linspace(0.7, -0.6, 16).reshape(SHAPE)
    a[0, 0, 0] = b[0, 0, 0] = 0.0
    return a, b


def test_accepts_everything_equals_plain_ddim():
    s = NoiseSchedule()
    torch.manual_seed(0)
    images = torch.rand(6, *SHAPE) * 2 - 1
    from cpsample_fast.models import EmpiricalDenoiser

    model = EmpiricalDenoiser(images, s)
    prot = TemplateProtector(*_templates(), gamma=1.0)  # |f| small: never near the gate
    res = rejection_sample(
        model, prot, s, 10, alpha=1e-9, num_inference_steps=8, seed=3, batch_size=4
    )
    want = reference_sample(model, None, s, (10, *SHAPE), num_inference_steps=8, seed=3)
    err = (res.samples - want).abs().max().item()
    print("max |rejection - reference DDIM|:", err, res.message)
    assert res.n_accepted == 10 and res.n_drawn == 12 and not res.exhausted
    assert res.accepted_index.tolist() == list(range(10))
    assert err < 1e-5
    assert res.acceptance_rate == 1.0
    assert res.model_evaluations == 12 * 8 and res.protector_evaluations == 12
    assert res.evals_per_accepted == pytest.approx(12 * 8 / 10)


def test_acceptance_rate_matches_known_copy_fraction():
    s = NoiseSchedule()
    a, b = _templates()
    tau = 0.5  # copies of A (confident protector, rejected): 1 - Φ(0.5) = 0.3085
    model = TwoTemplateModel(a, b, s, tau)
    prot = TemplateProtector(a, b)
    res = rejection_sample(
        model, prot, s, 300, alpha=0.3, num_inference_steps=10, seed=0, max_draws=600,
        batch_size=200,
    )  # fmt: skip
    p_accept = 0.5 * (1 + math.erf(tau / math.sqrt(2)))  # Φ(τ): copies of B are accepted
    sd = math.sqrt(p_accept * (1 - p_accept) / res.n_drawn)
    print("acceptance", res.acceptance_rate, "expected", p_accept, "sd", sd, res.message)
    assert abs(res.acceptance_rate - p_accept) < 4 * sd
    # Every accepted sample is B, every copy of A was rejected.
    assert (res.samples - b).abs().max() < 1e-4
    from cpsample_fast.noise import initial_noise

    x_t = initial_noise(0, (res.n_drawn, *SHAPE))
    s1_T = float((1 - s.alphas_cumprod[s.timesteps(10)[0]]).sqrt())
    expect_b = (x_t[:, 0, 0, 0] / s1_T <= tau).nonzero().flatten()
    assert res.accepted_index.tolist() == expect_b[: res.n_accepted].tolist()


def test_budget_that_runs_out_returns_what_it_has():
    s = NoiseSchedule()
    a, b = _templates()
    model = TwoTemplateModel(a, b, s, tau=0.0)  # half the samples are copies of A
    with pytest.warns(RuntimeWarning, match="budget of 20 ran out"):
        res = rejection_sample(
            model, TemplateProtector(a, b), s, 19, alpha=0.3, num_inference_steps=5,
            max_draws=20, batch_size=8,
        )  # fmt: skip
    assert res.exhausted and res.n_drawn == 20
    assert 0 < res.n_accepted < 19
    assert "ran out" in res.to_dict()["message"]
    assert res.samples.shape == (res.n_accepted, *SHAPE)


def test_nothing_accepted_reports_infinite_cost():
    s = NoiseSchedule()
    a, b = _templates()
    model = TwoTemplateModel(a, b, s, tau=-50.0)  # every sample is a copy of A
    with pytest.warns(RuntimeWarning):
        res = rejection_sample(
            model, TemplateProtector(a, b), s, 4, alpha=0.3, num_inference_steps=5, max_draws=8
        )
    assert res.n_accepted == 0 and res.acceptance_rate == 0.0
    assert res.evals_per_accepted == math.inf
    assert res.to_dict()["model_evaluations_per_accepted"] is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 0.0}, "alpha must lie in"),
        ({"alpha": 0.6}, "alpha must lie in"),
        ({"alpha": 0.3, "max_draws": 3}, "max_draws .* >= n = 4"),
        ({"alpha": 0.3, "score_timestep": 1000}, "score_timestep"),
    ],
)
def test_bad_input(kwargs, match):
    s = NoiseSchedule()
    a, b = _templates()
    model = TwoTemplateModel(a, b, s, 0.0)
    with pytest.raises(ValueError, match=match):
        rejection_sample(model, TemplateProtector(a, b), s, 4, **kwargs)


def test_protector_of_another_image_shape_is_refused():
    s = NoiseSchedule()
    a, b = _templates()
    model = TwoTemplateModel(a, b, s, 0.0)
    a8 = torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match=r"protector does not match the model's image shape"):
        rejection_sample(model, TemplateProtector(a8, a8 + 1), s, 4, alpha=0.3)
