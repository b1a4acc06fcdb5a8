"""NoiseSchedule against diffusers' DDIMScheduler: ᾱ, timesteps, step coefficients, config.

Every comparison is bit-exact (``torch.equal``): the schedule keeps diffusers' float32 operation
order, so nothing should round differently. Max differences are printed before asserting.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cpsample_fast.schedule import COEFFICIENT_KEYS, NoiseSchedule

diffusers = pytest.importorskip("diffusers")
DDIMScheduler = diffusers.DDIMScheduler
DDPMScheduler = diffusers.DDPMScheduler

T = 1000
_RANDOM_BETAS = (torch.rand(T, generator=torch.Generator().manual_seed(0)) * 0.02 + 1e-4).numpy()
SCHEDULES = {
    "linear": {"beta_schedule": "linear"},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "trained": {"trained_betas": _RANDOM_BETAS},
}
SPACINGS = ("leading", "trailing", "linspace")
# Odd n, n that do not divide T, n where diffusers' trailing grid has an extra entry (61, 103),
# and the extremes 1 and T.
STEPS = (1, 3, 7, 10, 50, 61, 103, 250, 999, T)


def _pair(schedule: str, **kwargs):
    """The same config as (NoiseSchedule, DDIMScheduler)."""
    config = {**SCHEDULES[schedule], **kwargs}
    return NoiseSchedule(T, **config), DDIMScheduler(num_train_timesteps=T, **config)


def _diffusers_coefficients(sched, n: int, eta: float) -> dict[str, torch.Tensor]:
    """Coefficients exactly as ``DDIMScheduler.step`` forms them, one 0-dim tensor per step."""
    sched.set_timesteps(n)
    out = {k: [] for k in COEFFICIENT_KEYS}
    for timestep in sched.timesteps[:n]:
        prev_timestep = timestep - sched.config.num_train_timesteps // sched.num_inference_steps
        alpha_prod_t = sched.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            sched.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else sched.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t
        variance = sched._get_variance(timestep, prev_timestep)
        std_dev_t = eta * variance ** (0.5)
        out["sqrt_alpha"].append(alpha_prod_t ** (0.5))
        out["sqrt_one_minus_alpha"].append(beta_prod_t ** (0.5))
        out["sqrt_alpha_prev"].append(alpha_prod_t_prev ** (0.5))
        out["dir_coef"].append((1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5))
        out["sigma"].append(std_dev_t)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_alphas_cumprod_match_diffusers(schedule, set_alpha_to_one):
    ours, ref = _pair(schedule, set_alpha_to_one=set_alpha_to_one)
    diff = (ours.alphas_cumprod - ref.alphas_cumprod).abs().max().item()
    print(f"{schedule}: max |Δᾱ| = {diff:.3e}")
    assert ours.alphas_cumprod.dtype == torch.float32
    assert ours.alphas_cumprod.shape == (T,)
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_timesteps_and_coefficients_match_diffusers(
    schedule, spacing, steps_offset, set_alpha_to_one
):
    ours, ref = _pair(
        schedule,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=set_alpha_to_one,
    )
    for n in STEPS:
        if spacing == "leading" and (n - 1) * (T // n) + steps_offset > T - 1:
            # diffusers would index ᾱ out of range later; we refuse up front.
            with pytest.raises(ValueError, match="steps_offset"):
                ours.timesteps(n)
            continue
        ref.set_timesteps(n)
        ts = ours.timesteps(n)
        assert ts.dtype == torch.int64 and ts.shape == (n,)
        # diffusers' float trailing grid sometimes has one extra entry, always -1 (see docstring).
        assert torch.equal(ts, ref.timesteps[:n]), (n, ts, ref.timesteps)
        assert ref.timesteps[n:].tolist() in ([], [-1])
        assert torch.all(ts[:-1] > ts[1:]) and ts.min() >= 0 and ts.max() <= T - 1
        prev = ours.prev_timesteps(n)
        expected_prev = torch.stack([t - T // ref.num_inference_steps for t in ref.timesteps[:n]])
        assert torch.equal(prev, expected_prev)
        # Long grids cost ~1 ms per step in 0-dim diffusers ops: one η there, three on short ones.
        for eta in (0.3,) if n >= 250 else (0.0, 0.3, 1.0):
            got = ours.step_coefficients(n, eta)
            want = _diffusers_coefficients(ref, n, eta)
            assert set(got) == set(COEFFICIENT_KEYS)
            # Where 1 - ᾱ' - σ² rounds below 0 (η = 1, ᾱ_t ≈ 0, ᾱ' = ᾱ_0) diffusers takes √ of a
            # negative and returns NaN; we return 0, the exact-arithmetic value's floor.
            nan = torch.isnan(want["dir_coef"])
            if nan.any():
                print(f"n={n} eta={eta}: diffusers dir_coef NaN at {nan.sum().item()} steps")
                assert eta == 1.0 and torch.all(got["dir_coef"][nan] == 0)
                want["dir_coef"] = torch.where(nan, got["dir_coef"], want["dir_coef"])
            for key in COEFFICIENT_KEYS:
                assert got[key].dtype == torch.float32 and got[key].shape == (n,)
                diff = (got[key] - want[key]).abs().max().item()
                if not torch.equal(got[key], want[key]):
                    print(f"n={n} eta={eta} {key}: max |Δ| = {diff:.3e}")
                assert torch.equal(got[key], want[key]), (n, eta, key)


def test_coefficients_are_consistent():
    """√ᾱ² + √(1-ᾱ)² = 1 and d² + σ² = 1 - ᾱ' (to float32 rounding); η = 0 gives σ = 0."""
    sched = NoiseSchedule.cosine(timestep_spacing="trailing")
    for eta in (0.0, 0.5, 1.0):
        c = sched.step_coefficients(17, eta)
        one = c["sqrt_alpha"] ** 2 + c["sqrt_one_minus_alpha"] ** 2
        rest = c["dir_coef"] ** 2 + c["sigma"] ** 2 + c["sqrt_alpha_prev"] ** 2
        err = max((one - 1).abs().max().item(), (rest - 1).abs().max().item())
        print(f"eta={eta}: max identity error {err:.3e}")
        assert err < 1e-6
        assert torch.isfinite(torch.stack(list(c.values()))).all()
        if eta == 0:
            assert torch.equal(c["sigma"], torch.zeros(17))
    # The last step of a leading schedule with set_alpha_to_one lands on ᾱ' = 1 exactly.
    c = NoiseSchedule().step_coefficients(10, 1.0)
    assert c["sqrt_alpha_prev"][-1] == 1 and c["dir_coef"][-1] == 0 and c["sigma"][-1] == 0


def test_step_coefficients_device_argument():
    c = NoiseSchedule().step_coefficients(5, 0.0, device="cpu")
    assert all(v.device.type == "cpu" for v in c.values())


def test_eta_above_one_that_breaks_ddim_raises():
    sched = NoiseSchedule()
    # η slightly above 1 can still be valid at every step of a coarse grid; η = 3 is not.
    with pytest.raises(ValueError, match="eta"):
        sched.step_coefficients(10, 3.0)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_add_noise_matches_diffusers(schedule):
    ours, ref = _pair(schedule)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 5, 7, generator=g)  # odd batch, odd sizes
    noise = torch.randn(3, 2, 5, 7, generator=g)
    t = torch.tensor([0, 517, T - 1])
    got = ours.add_noise(x0, noise, t)
    want = ref.add_noise(x0, noise, t)
    print(f"{schedule}: add_noise max |Δ| = {(got - want).abs().max().item():.3e}")
    assert torch.equal(got, want)
    # A scalar t broadcasts over the batch.
    assert torch.equal(ours.add_noise(x0, noise, 517), ours.add_noise(x0, noise, t.fill_(517)))


def test_add_noise_bad_inputs():
    sched = NoiseSchedule()
    x0 = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match="t must lie"):
        sched.add_noise(x0, x0, torch.tensor([0, 1, T]))
    with pytest.raises(ValueError, match="t must lie"):
        sched.add_noise(x0, x0, torch.tensor([-1, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        sched.add_noise(x0, x0, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        sched.add_noise(x0, x0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise"):
        sched.add_noise(x0, torch.zeros(3, 1, 2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="x0"):
        sched.add_noise(torch.zeros(3, 1, 2, 2, dtype=torch.int64), x0, torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------- config


def _schedules_for_config():
    return [
        NoiseSchedule(),
        NoiseSchedule.linear(500, beta_start=2e-4, beta_end=0.03, prediction_type="v_prediction"),
        NoiseSchedule.scaled_linear(timestep_spacing="trailing", clip_sample=False),
        NoiseSchedule.cosine(
            set_alpha_to_one=False, steps_offset=1, prediction_type="sample", clip_sample_range=2.5
        ),
        NoiseSchedule.from_betas(_RANDOM_BETAS[:77], timestep_spacing="linspace"),
    ]


@pytest.mark.parametrize("sched", _schedules_for_config(), ids=repr)
def test_config_round_trip(sched):
    config = json.loads(json.dumps(sched.to_config()))
    again = NoiseSchedule.from_config(config)
    assert again.to_config() == sched.to_config()
    assert again == sched and hash(again) == hash(sched)
    assert torch.equal(again.alphas_cumprod, sched.alphas_cumprod)
    assert torch.equal(again.final_alpha_cumprod, sched.final_alpha_cumprod)
    n = 7
    assert torch.equal(again.timesteps(n), sched.timesteps(n))
    assert "NoiseSchedule(" in repr(sched) and sched.prediction_type in repr(sched)
    # The same config builds a diffusers scheduler with the same ᾱ.
    ref = DDIMScheduler(**config)
    assert torch.equal(ref.alphas_cumprod, sched.alphas_cumprod)


def test_classmethods_set_the_schedule():
    assert NoiseSchedule.linear().beta_schedule == "linear"
    assert NoiseSchedule.scaled_linear().beta_schedule == "scaled_linear"
    assert NoiseSchedule.cosine().beta_schedule == "squaredcos_cap_v2"
    sched = NoiseSchedule.from_betas([0.1, 0.2, 0.3])
    assert sched.num_train_timesteps == 3
    assert torch.allclose(sched.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504]))
    assert NoiseSchedule() != NoiseSchedule.cosine()


def test_defaults_match_ddim_scheduler():
    ours = NoiseSchedule().to_config()
    ref = DDIMScheduler().config
    for key, value in ours.items():
        assert ref[key] == value, key


def test_from_diffusers_instance_and_dict():
    ref = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
        timestep_spacing="leading",
    )
    for obj in (ref, ref.config, dict(ref.config), json.loads(json.dumps(dict(ref.config)))):
        sched = NoiseSchedule.from_diffusers(obj)
        assert sched.prediction_type == "v_prediction" and sched.steps_offset == 1
        assert not sched.clip_sample and not sched.set_alpha_to_one
        assert torch.equal(sched.alphas_cumprod, ref.alphas_cumprod)
        ref.set_timesteps(10)
        assert torch.equal(sched.timesteps(10), ref.timesteps)
    # DDPMScheduler shares the keys (no set_alpha_to_one: the DDIM default applies).
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    sched = NoiseSchedule.from_diffusers(ddpm)
    assert torch.equal(sched.alphas_cumprod, ddpm.alphas_cumprod)
    assert sched.timestep_spacing == "trailing" and sched.set_alpha_to_one
    # trained_betas stored in a diffusers config.
    ref = DDIMScheduler(trained_betas=_RANDOM_BETAS.tolist())
    sched = NoiseSchedule.from_diffusers(ref)
    assert torch.equal(sched.alphas_cumprod, ref.alphas_cumprod)


@pytest.mark.parametrize(
    "config, key",
    [
        ({"thresholding": True}, "thresholding"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"prediction_type": "flow"}, "prediction_type"),
    ],
)
def test_from_diffusers_refuses_unsupported(config, key):
    ref = DDIMScheduler(**config)
    with pytest.raises(ValueError, match=key):
        NoiseSchedule.from_diffusers(ref)
    with pytest.raises(ValueError, match=key):
        NoiseSchedule.from_diffusers(dict(ref.config))


def test_from_diffusers_refuses_unknown_beta_schedule():
    ddpm = DDPMScheduler(beta_schedule="sigmoid")  # valid in DDPM, not in DDIM
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_diffusers(ddpm)
    with pytest.raises(TypeError, match="from_diffusers"):
        NoiseSchedule.from_diffusers(42)


def test_from_config_refuses_unknown_keys():
    with pytest.raises(ValueError, match="thresholding"):
        NoiseSchedule.from_config({"thresholding": False})
    with pytest.raises(TypeError, match="mapping"):
        NoiseSchedule.from_config([("beta_schedule", "linear")])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_train_timesteps": 0}, ValueError, "num_train_timesteps"),
        ({"num_train_timesteps": 10.0}, TypeError, "num_train_timesteps"),
        ({"beta_schedule": "sigmoid"}, ValueError, "beta_schedule"),
        ({"timestep_spacing": "uniform"}, ValueError, "timestep_spacing"),
        ({"prediction_type": "x0"}, ValueError, "prediction_type"),
        ({"beta_start": float("nan")}, ValueError, "beta_start"),
        ({"beta_end": "0.02"}, TypeError, "beta_end"),
        ({"beta_end": 1.5}, ValueError, "beta_start/beta_end"),
        ({"beta_start": 0.0}, ValueError, "beta_start/beta_end"),
        ({"beta_schedule": "scaled_linear", "beta_start": -0.1}, ValueError, "beta_start"),
        ({"trained_betas": [0.1] * 999}, ValueError, "trained_betas"),
        ({"trained_betas": [0.1] * 999 + [1.0]}, ValueError, "trained_betas"),
        ({"trained_betas": [[0.1] * 1000]}, ValueError, "trained_betas"),
        ({"trained_betas": ["a"] * 1000}, TypeError, "trained_betas"),
        ({"clip_sample": 1}, TypeError, "clip_sample"),
        ({"set_alpha_to_one": "yes"}, TypeError, "set_alpha_to_one"),
        ({"clip_sample_range": 0.0}, ValueError, "clip_sample_range"),
        ({"steps_offset": -1}, ValueError, "steps_offset"),
        ({"steps_offset": 1.0}, TypeError, "steps_offset"),
    ],
)
def test_constructor_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        NoiseSchedule(**kwargs)


@pytest.mark.parametrize("method", ["timesteps", "prev_timesteps", "step_coefficients"])
def test_num_inference_steps_is_validated(method):
    sched = NoiseSchedule(T)
    fn = getattr(sched, method)
    for bad in (0, -3, T + 1):
        with pytest.raises(ValueError, match="num_inference_steps"):
            fn(bad)
    with pytest.raises(TypeError, match="num_inference_steps"):
        fn(10.0)
    out = fn(T)
    assert (out["sigma"] if method == "step_coefficients" else out).shape == (T,)


def test_eta_is_validated():
    sched = NoiseSchedule()
    with pytest.raises(ValueError, match="eta"):
        sched.step_coefficients(10, -0.1)
    with pytest.raises(ValueError, match="eta"):
        sched.step_coefficients(10, math.inf)
    with pytest.raises(TypeError, match="eta"):
        sched.step_coefficients(10, "0.5")
    assert torch.isfinite(sched.step_coefficients(10, np.float64(0.5))["sigma"]).all()


def test_eta_one_over_all_steps_is_ddpm_ancestral():
    """η = 1 with n = T is DDPM's ancestral step (docs/ALGORITHM.md §3): same posterior mean and
    variance."""
    ours = NoiseSchedule.cosine()
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_small")
    c = {k: v.double() for k, v in ours.step_coefficients(T, 1.0).items()}
    t = ours.timesteps(T)
    assert torch.equal(t, torch.arange(T - 1, -1, -1))
    # x_{t-1} = sp·x0 + d·(x_t - sa·x0)/s1 + σz  =  (sp - d·sa/s1)·x0 + (d/s1)·x_t + σz
    coef_x0 = c["sqrt_alpha_prev"] - c["dir_coef"] * c["sqrt_alpha"] / c["sqrt_one_minus_alpha"]
    coef_xt = c["dir_coef"] / c["sqrt_one_minus_alpha"]
    a = ours.alphas_cumprod.double().flip(0)  # ᾱ_t in loop order
    a_prev = torch.cat([a[1:], torch.ones(1, dtype=torch.float64)])
    beta_t = 1 - a / a_prev
    want_x0 = a_prev.sqrt() * beta_t / (1 - a)
    want_xt = (1 - beta_t).sqrt() * (1 - a_prev) / (1 - a)
    want_var = torch.stack([ddpm._get_variance(int(s)) for s in t]).double()
    # Both coefficients multiply O(1) images, so absolute error is the meaningful measure; the
    # float32 cancellations in d = √(1-ᾱ'-σ²) and sp - d·sa/s1 leave 3.2e-5 (the same formulas
    # in float64 from the same ᾱ agree to 1.2e-13, so this is rounding, not a math mismatch).
    err_x0 = (coef_x0 - want_x0).abs().max().item()
    err_xt = (coef_xt - want_xt).abs().max().item()
    # The last step (t = 0) has σ = 0 here and DDPM's variance clamped to 1e-20.
    err_var = ((c["sigma"][:-1] ** 2 - want_var[:-1]).abs() / want_var[:-1]).max().item()
    print(f"DDPM coefficient errors: |Δx0 coef| {err_x0:.3e}, |Δx_t coef| {err_xt:.3e}, ", end="")
    print(f"variance rel {err_var:.3e}")
    assert err_x0 < 1e-4 and err_xt < 1e-4 and err_var < 1e-5
    assert c["sigma"][-1] == 0 and want_var[-1] <= 1e-20


def test_forward_noise_is_the_one_formula():
    """add_noise, the protector's noised and the closed form agree bit for bit."""
    from cpsample_fast.protector.report import noised
    from cpsample_fast.schedule import alphas_cumprod_of, forward_noise

    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 3, 3, generator=g)
    eps = torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    ac = alphas_cumprod_of(s)
    ref = ac[t].sqrt()[:, None, None, None] * x0 + (1 - ac[t]).sqrt()[:, None, None, None] * eps
    for got in (s.add_noise(x0, eps, t), noised(x0, t, eps, ac), forward_noise(x0, eps, t, ac)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        alphas_cumprod_of(object())
