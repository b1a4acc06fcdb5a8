"""ProtectedScheduler: the one-line switch around diffusers schedulers (tiny random models)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from diffusers_tiny import C, H, LinearProtector, tiny_unet  # noqa: E402

from cpsample_fast import CPSampler  # noqa: E402
from cpsample_fast.diffusers import SUPPORTED_SCHEDULERS, ProtectedScheduler  # noqa: E402
from cpsample_fast.integrations.diffusers import DiffusersEpsModel  # noqa: E402
from cpsample_fast.schedule import NoiseSchedule  # noqa: E402


def run_loop(unet, scheduler, n, batch, seed=0, step_seed=7, **step_kwargs):
    """The loop every diffusers pipeline runs (init_noise_sigma, scale_model_input, step)."""
    scheduler.set_timesteps(n)
    x = torch.randn(batch, C, H, H, generator=torch.Generator().manual_seed(seed))
    x = x * scheduler.init_noise_sigma
    params = inspect.signature(scheduler.step).parameters
    if "generator" in params:
        step_kwargs["generator"] = torch.Generator().manual_seed(step_seed)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_line_switch_scale0_and_shut_gate_reproduce_ddim_pipeline(eta):
    unet = tiny_unet()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=3, num_inference_steps=5, eta=eta, output_type="pt")
    base = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    inner = pipe.scheduler
    for scale, alpha in ((0.0, 0.1), (100.0, 1e-30)):  # off; on but the gate never opens
        pipe.scheduler = ProtectedScheduler(inner, LinearProtector(), scale=scale, alpha=alpha)
        got = pipe(generator=torch.Generator().manual_seed(3), **kw).images
        assert (got - base).abs().max().item() <= 1e-5
    trace = pipe.scheduler.trace
    assert trace.gate.shape == (5, 3) and not trace.gate.any()
    assert torch.isfinite(trace.confidence).all()


def _make(name, **config):
    return getattr(diffusers, name)(num_train_timesteps=1000, **config)


_SCHEDULER_CASES = [
    ("DDIMScheduler", {}),  # clip_sample=True: the consistent-clip path
    ("DDPMScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("UniPCMultistepScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction", "use_karras_sigmas": True}),
]


@pytest.mark.parametrize("name,config", _SCHEDULER_CASES)
def test_guided_runs_differ_exactly_where_the_gate_opened(name, config):
    unet = tiny_unet()
    n, batch = 4, 8
    base = run_loop(unet, _make(name, **config), n, batch)
    prot = LinearProtector(k=3.0)
    shut = ProtectedScheduler(_make(name, **config), prot, scale=100.0, alpha=1e-30)
    assert torch.equal(run_loop(unet, shut, n, batch), base)
    # guide at the first step only: its gate depends on x_T alone, so a batch gets both kinds
    first = _make(name, **config)
    first.set_timesteps(n)
    t0 = float(first.timesteps[0])
    sched = ProtectedScheduler(
        _make(name, **config), prot, scale=30.0, alpha=0.1, guidance_range=(t0, 10**6)
    )
    got = run_loop(unet, sched, n, batch)
    assert torch.isfinite(got).all()
    assert torch.isnan(sched.trace.confidence[1:]).all() and not sched.trace.gate[1:].any()
    gated = sched.trace.gate.any(dim=0)
    assert gated.any() and not gated.all(), sched.trace.gate  # the case needs both kinds
    diff = (got - base).flatten(1).abs().amax(dim=1)
    assert torch.equal(diff[~gated], torch.zeros_like(diff[~gated]))
    # every gated sample moved (a clip-saturated x̂0 can keep the move small)
    assert (diff[gated] > 0).all() and diff[gated].max() > 0.1, diff
    # guided at every step: finite, and the trace has one row per step call
    full = ProtectedScheduler(_make(name, **config), prot, scale=30.0, alpha=0.1)
    got = run_loop(unet, full, n, batch)
    assert torch.isfinite(got).all() and full.trace.gate.any()
    assert full.trace.gate.shape == (len(full.timesteps), batch)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guided_wrapper_equals_fast_cpsampler_under_ddim(prediction_type, eta):
    # clip_sample=False until the clip rule lands in CPSampler (branch core)
    unet = tiny_unet()
    config = dict(clip_sample=False, prediction_type=prediction_type)
    n, batch, scale, alpha = 5, 4, 20.0, 0.5
    prot = LinearProtector(k=3.0)
    sched = ProtectedScheduler(_make("DDIMScheduler", **config), prot, scale=scale, alpha=alpha)
    sched.set_timesteps(n)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, C, H, H, generator=gen)
    for t in sched.timesteps:
        with torch.no_grad():
            out = unet(x, t).sample
        x = sched.step(out, t, x, eta=eta, generator=gen).prev_sample
    sampler = CPSampler(
        DiffusersEpsModel(unet),
        prot,
        NoiseSchedule.from_diffusers(sched.config),
        num_inference_steps=n,
        eta=eta,
        scale=scale,
        alpha=alpha,
        backend="torch",
    )
    fast, trace = sampler.sample(
        (batch, C, H, H), generator=torch.Generator().manual_seed(5), return_trace=True
    )
    plain = sampler.__class__(
        DiffusersEpsModel(unet),
        None,
        NoiseSchedule.from_diffusers(sched.config),
        num_inference_steps=n,
        eta=eta,
        backend="torch",
    ).sample((batch, C, H, H), generator=torch.Generator().manual_seed(5))
    rel = ((fast - x).abs().max() / x.abs().max()).item()
    assert rel <= 1e-4, rel
    assert ((fast - plain).abs().max() / plain.abs().max()).item() > 1e-2  # guidance acted
    assert torch.equal(trace.gate.cpu(), sched.trace.gate)


def test_consistent_clip_rule_in_one_ddim_step():
    """docs/ALGORITHM.md §3 step 6 by hand: x' = sp·clip(x̂0_g) + d·(ε − (sa/s1)·Δ)."""
    sched = diffusers.DDIMScheduler(clip_sample=True)
    n = 10
    sched.set_timesteps(n)
    t = sched.timesteps[7]  # a low-noise step: x̂0 saturates the clip for large x
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(6, C, H, H, generator=g)
    eps = torch.randn(6, C, H, H, generator=g)
    prot = LinearProtector(k=40.0)
    scale = 5.0
    wrapped = ProtectedScheduler(sched, prot, scale=scale, alpha=0.5)
    got = wrapped.step(eps, t, x).prev_sample
    abar = sched.alphas_cumprod[int(t)]
    abar_p = sched.alphas_cumprod[int(t) - 1000 // n]
    sa, s1, sp, d = abar**0.5, (1 - abar) ** 0.5, abar_p**0.5, (1 - abar_p) ** 0.5
    xr = x.clone().requires_grad_(True)
    f = prot(xr, None)
    w = torch.sigmoid(-f.abs()) * torch.sign(f)  # repel: w(f)·sign(f)
    (grad,) = torch.autograd.grad(f, xr, grad_outputs=w)
    G = scale * s1 * grad
    x0 = (x - s1 * eps) / sa
    x0_g = x0 - (s1 / sa) * G
    delta = x0_g.clamp(-1, 1) - x0.clamp(-1, 1)
    want = sp * x0_g.clamp(-1, 1) + d * (eps - (sa / s1) * delta)
    assert (got - want).abs().max().item() < 1e-5
    plain = sched.step(eps, t, x).prev_sample
    # the guidance moves the step along its clipped shift of x̂0, never against it
    moved = (sp - d * sa / s1) * delta
    assert (got - plain - moved).abs().max().item() < 1e-5
    assert delta.abs().max() > 0.1 and (x0.abs() > 1).any()


def test_learned_variance_output_is_sliced():
    unet = tiny_unet(out_channels=2 * C)
    config = dict(variance_type="learned_range")
    base = run_loop(unet, _make("DDPMScheduler", **config), 3, 4)
    sched = ProtectedScheduler(
        _make("DDPMScheduler", **config), LinearProtector(k=3.0), scale=30.0, alpha=0.5
    )
    got = run_loop(unet, sched, 3, 4)
    assert got.shape == base.shape and torch.isfinite(got).all()
    assert not torch.equal(got, base)


def test_pipelines_see_the_inner_scheduler():
    inner = diffusers.EulerDiscreteScheduler()
    sched = ProtectedScheduler(inner, LinearProtector(), scale=1.0, alpha=0.1)
    assert sched.config is inner.config and sched.order == inner.order
    assert sched.init_noise_sigma == inner.init_noise_sigma
    assert list(inspect.signature(sched.step).parameters) == list(
        inspect.signature(inner.step).parameters
    )
    assert "sigmas" in inspect.signature(sched.set_timesteps).parameters
    sched.set_timesteps(4)
    assert torch.equal(sched.timesteps, inner.timesteps)
    x = torch.ones(1, C, H, H)
    want = x / (inner.sigmas[0] ** 2 + 1) ** 0.5
    assert torch.allclose(sched.scale_model_input(x, sched.timesteps[0]), want)
    # DiffusionPipeline's setattr accepts it
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler())
    pipe.scheduler = ProtectedScheduler(pipe.scheduler, LinearProtector(), scale=1.0, alpha=0.1)
    assert isinstance(pipe.scheduler, ProtectedScheduler)


def test_bad_input():
    with pytest.raises(ValueError, match="supported: DDIMScheduler"):
        ProtectedScheduler(diffusers.PNDMScheduler(), LinearProtector(), scale=1.0, alpha=0.1)
    with pytest.raises(ValueError, match="thresholding"):
        ProtectedScheduler(
            diffusers.DDPMScheduler(thresholding=True), LinearProtector(), scale=1.0, alpha=0.1
        )
    with pytest.raises(ValueError, match="alpha"):
        ProtectedScheduler(diffusers.DDIMScheduler(), LinearProtector(), scale=1.0, alpha=0.7)
    with pytest.raises(ValueError, match="scale"):
        ProtectedScheduler(diffusers.DDIMScheduler(), LinearProtector(), scale=-1.0, alpha=0.1)
    with pytest.raises(ValueError, match="mode"):
        ProtectedScheduler(
            diffusers.DDIMScheduler(), LinearProtector(), scale=1.0, alpha=0.1, mode="x"
        )
    trainable = nn.Linear(C * H * H, 1)
    with pytest.warns(UserWarning, match="not frozen"):
        ProtectedScheduler(diffusers.DDIMScheduler(), trainable, scale=1.0, alpha=0.1)
    bad = ProtectedScheduler(diffusers.DDIMScheduler(), lambda x, t: x, scale=1.0, alpha=0.1)
    bad.set_timesteps(2)
    x = torch.zeros(2, C, H, H)
    with pytest.raises(ValueError, match="protector must return logits of shape"):
        bad.step(x, bad.timesteps[0], x)
    assert set(SUPPORTED_SCHEDULERS) >= {
        "DDIMScheduler",
        "DDPMScheduler",
        "DPMSolverMultistepScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "UniPCMultistepScheduler",
    }
