"""Guidance after the clip (docs/ALGORITHM.md §3 step 6, docs/CONTRACTS.md "The fused update").

``x̂0 = clip(x0) - (s1/sa)·G``, ``ε̂ = ε + G``: the clip acts on the model's own x̂0 as in
diffusers, and the guidance's effect on ``x_{t'}`` is ``(sp - d·sa/s1)·shift`` with
``shift = -(s1/sa)·G`` the move of x̂0, a positive multiple whatever the clip did, so a guided
step never moves towards confidence; ``G = 0`` is diffusers' step bit for bit. Also diffusers'
``use_clipped_model_output``, NaN through every clip, and the exact gate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cpsample_fast import CPSampler, guidance, ops
from cpsample_fast.reference import reference_sample
from cpsample_fast.schedule import NoiseSchedule
from cpsample_fast.schedule_tables import ddim_coef_table

SHAPE = (5, 2, 4, 6)  # odd batch, non-power-of-two sample
BACKENDS = ops.available_backends("cpu")  # torch, cpp (when built), triton (interpreter)


class LinearProtector(torch.nn.Module):
    """``f(x, t) = <w, x> + b``: ``∇f = w`` exactly."""

    def __init__(self, w: torch.Tensor, bias: float = 0.0):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.bias = bias

    def forward(self, x, t):
        return (x * self.w.to(x.dtype)).flatten(1).sum(1) + self.bias


class ConvEps(torch.nn.Module):
    """A small seeded conv eps-model with a time input."""

    def __init__(self, channels: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) + 0.1 * (t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1)


def _coefs(abar_t: float, abar_prev: float, eta: float = 0.0, clip: float = 1.0):
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    d = math.sqrt(1 - abar_prev - sigma**2)
    vals = [math.sqrt(abar_t), math.sqrt(1 - abar_t), math.sqrt(abar_prev), d, sigma, clip]
    return torch.tensor(vals, dtype=torch.float32)


def _update(backend, x, o, g, z, coefs, *, p=0, clip=True, clipped_eps=False):
    return ops.guided_update(
        x,
        o,
        g,
        z,
        coefs,
        torch.tensor([3, 1, 0]),
        prediction_type=p,
        clip_sample=clip,
        draw_noise=False,
        backend=backend,
        use_clipped_model_output=clipped_eps,
    )


def _mixed_case(coefs: torch.Tensor, seed: int = 0):
    """x, o, G with every clip case present: x0 and x0g both inside, x0 inside and x0g outside,
    both outside, and the guidance zero on samples 0 and 3 (gated shut)."""
    gen = torch.Generator().manual_seed(seed)
    sa, s1 = float(coefs[0]), float(coefs[1])
    x0 = 1.6 * torch.rand(SHAPE, generator=gen) * 2 - 1.6  # in [-1.6, 1.6]: some saturate
    o = torch.randn(SHAPE, generator=gen)
    x = sa * x0 + s1 * o  # epsilon prediction: the model's x0 is x0 (up to rounding)
    shift = 0.8 * torch.randn(SHAPE, generator=gen)  # the guidance's shift of x0
    g = -(sa / s1) * shift
    g[0] = 0.0
    g[3] = 0.0
    return x, o, g


def _rule_f32(x, o, g, z, coefs, clip_sample=True):
    """The rule written plainly in float32 (epsilon prediction), as reference.py writes it."""
    sa, s1, sp, d, sigma, c = coefs.unbind(0)
    x0 = (x - s1 * o) / sa
    if clip_sample:
        x0 = x0.clamp(-c, c)
    return sp * (x0 - (s1 / sa) * g) + d * (o + g) + sigma * z


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_applies_the_rule_elementwise(backend):
    coefs = _coefs(0.3, 0.4, eta=0.5)
    x, o, g = _mixed_case(coefs)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    sa, s1, c = float(coefs[0]), float(coefs[1]), float(coefs[5])
    x0 = (x - s1 * o) / sa
    x0g = x0 - (s1 / sa) * g
    inside, outside = x0.abs() <= c, x0.abs() > c
    # every case is present, so a backend that drops a branch cannot pass
    assert (inside & (x0g.abs() <= c) & (g != 0)).any()
    assert (inside & (x0g.abs() > c)).any()
    assert (outside & (x0g.abs() > c) & (g != 0)).any()
    out = _update(backend, x, o, g, z, coefs)
    want = _rule_f32(x, o, g, z, coefs)
    err = (out - want).abs().max().item()
    print(f"{backend}: max |op - plain rule| = {err:.2e}")
    assert err <= 4e-6 * max(want.abs().max().item(), 1.0)
    # the pre-fix step (x̂0 = clip(x0g), ε̂ = ε + G) differs where the clip cut the shift
    sp, d, sigma = (float(v) for v in coefs[2:5])
    old = sp * x0g.clamp(-c, c) + d * (o + g) + sigma * z
    assert (out - old).abs().max() > 1e-2
    # gated samples (G = 0) take the unguided step bit for bit
    plain = _update(backend, x, o, None, z, coefs)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[3], plain[3])


def test_rule_in_float64_closed_form():
    """One step with hand-picked numbers; every quantity computed by hand in float64."""
    abar_t, abar_prev = 0.25, 0.36  # sa = 0.5, s1 = √0.75, sp = 0.6, d = 0.8 (η = 0)
    sa, s1, sp, d = 0.5, math.sqrt(0.75), 0.6, 0.8
    coefs = _coefs(abar_t, abar_prev)
    # per element: (x0, shift of x0 by the guidance, ε)
    cases = [
        (0.2, 0.3, 0.1),
        (0.7, 0.6, -0.4),
        (-0.9, -0.5, 0.3),
        (1.4, 0.5, 0.2),
        (1.4, -0.9, 0.0),
        (-1.2, 3.0, -1.0),
        (0.0, 0.0, 0.5),
    ]
    want = []
    for x0, shift, eps in cases:
        x0_hat = min(max(x0, -1.0), 1.0) + shift  # the guidance acts after the clip
        eps_hat = eps - (sa / s1) * shift  # G = -(sa/s1)·shift
        want.append(sp * x0_hat + d * eps_hat)
        # total effect of the guidance = (sp - d·sa/s1)·shift, with a positive coefficient
        base = sp * min(max(x0, -1.0), 1.0) + d * eps
        assert math.isclose(want[-1] - base, (sp - d * sa / s1) * shift, abs_tol=1e-12)
    assert sp - d * sa / s1 > 0
    x0 = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    eps = torch.tensor([c[2] for c in cases], dtype=torch.float64)
    g = -(sa / s1) * torch.tensor([c[1] for c in cases], dtype=torch.float64)
    x = sa * x0 + s1 * eps
    f32 = [t.float().view(1, -1) for t in (x, eps, g)]
    for backend in BACKENDS:
        out = _update(backend, *f32[:2], f32[2], None, coefs).double().view(-1)
        err = (out - torch.tensor(want, dtype=torch.float64)).abs().max().item()
        print(f"{backend}: max |op - float64 closed form| = {err:.2e}")
        assert err < 2e-6


def test_effect_coefficient_is_positive_on_every_step():
    """sp - d·sa/s1 > 0 whenever ᾱ' > ᾱ_t: the step moves along the guidance's shift of x̂0."""
    for config in [
        {},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"timestep_spacing": "trailing"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    ]:
        s = NoiseSchedule(**config)
        for eta in (0.0, 0.5, 1.0):
            c = s.step_coefficients(50, eta)
            k = c["sqrt_alpha_prev"].double() - c["dir_coef"].double() * (
                c["sqrt_alpha"].double() / c["sqrt_one_minus_alpha"].double()
            )
            assert (k > 0).all(), (config, eta, k.min())


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_guidance_is_diffusers_step_bit_for_bit(backend):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler()
    sched.set_timesteps(10)
    table = ddim_coef_table(NoiseSchedule(), 10, 0.0)  # the op's coefs rows
    gen = torch.Generator().manual_seed(2)
    for k in (0, 4, 9):
        t = sched.timesteps[k]
        x = 2 * torch.randn(SHAPE, generator=gen)
        o = torch.randn(SHAPE, generator=gen)
        coefs = table[k]
        want = sched.step(o, t, x, eta=0.0).prev_sample
        got = _update(backend, x, o, torch.zeros_like(x), None, coefs)  # a gate shut everywhere
        assert torch.equal(got, want), (backend, k)


def test_unsaturated_elements_keep_the_old_formula():
    coefs = _coefs(0.5, 0.6)
    gen = torch.Generator().manual_seed(4)
    x0 = 0.5 * torch.rand(SHAPE, generator=gen) - 0.25
    o = torch.randn(SHAPE, generator=gen)
    x = float(coefs[0]) * x0 + float(coefs[1]) * o
    g = 0.1 * torch.randn(SHAPE, generator=gen)  # small: nothing reaches the clip
    out = _update("torch", x, o, g, None, coefs)
    old = _update("torch", x, o, g, None, coefs, clip=False)  # ε̂ = ε + G, no clip
    assert (out - old).abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_survives_every_clip(backend):
    """A NaN x̂0 must stay NaN (torch.clamp semantics) so the non-finite check sees it; Triton's
    min/max (also under the interpreter: np.fmin/fmax) would return the bound (issue 13)."""
    coefs = _coefs(0.3, 0.4)
    x, o, g = _mixed_case(coefs)
    x[1, 0, 0, 0] = float("nan")
    o[2, 1, 1, 1] = float("nan")
    for clipped_eps in (False, True):
        for gg in (g, None):
            out = _update(backend, x, o, gg, None, coefs, clipped_eps=clipped_eps)
            assert torch.isnan(out[1, 0, 0, 0]) and torch.isnan(out[2, 1, 1, 1])
            assert torch.isnan(out).sum() == 2


# ---------------------------------------------------------------------------------------------
# use_clipped_model_output (diffusers' DDIMScheduler.step option)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0, 1, 2])
def test_clipped_model_output_formula(backend, p):
    coefs = _coefs(0.3, 0.4, eta=0.5)
    x, o, g = _mixed_case(coefs)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    sa, s1, sp, d, sigma, c = coefs.unbind(0)
    x0 = {0: (x - s1 * o) / sa, 1: sa * x - s1 * o, 2: o}[p]
    x0_hat = x0.clamp(-c, c) - (s1 / sa) * g
    want = sp * x0_hat + d * ((x - sa * x0_hat) / s1) + sigma * z
    out = _update(backend, x, o, g, z, coefs, p=p, clipped_eps=True)
    err = (out - want).abs().max().item()
    assert err <= 4e-6 * max(want.abs().max().item(), 1.0), err
    assert (out - _update(backend, x, o, g, z, coefs, p=p)).abs().max() > 1e-3


DIFFUSERS_CONFIGS = [
    ({}, 0.0),
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 0.5),
    ({"prediction_type": "sample", "clip_sample_range": 0.7}, 1.0),
    ({"clip_sample": False}, 0.3),
]


@pytest.mark.parametrize("config, eta", DIFFUSERS_CONFIGS)
def test_use_clipped_model_output_matches_diffusers(config, eta):
    diffusers = pytest.importorskip("diffusers")
    n, shape = 6, (3, 2, 6, 6)
    torch.manual_seed(11)
    model = ConvEps(2).eval()
    gen = torch.Generator().manual_seed(12)
    noise = torch.randn(shape, generator=gen)
    step_noise = torch.randn((n, *shape), generator=gen)
    sched = diffusers.DDIMScheduler(**config)
    sched.set_timesteps(n)
    x = noise.clone()
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            out = model(x, t.repeat(shape[0]))
            x = sched.step(
                out,
                t,
                x,
                eta=eta,
                use_clipped_model_output=True,
                variance_noise=step_noise[k] if eta > 0 else None,
            ).prev_sample
    want = x
    schedule = NoiseSchedule.from_diffusers(config)
    kw = dict(
        num_inference_steps=n, eta=eta, noise=noise, step_noise=step_noise if eta > 0 else None
    )
    ref = reference_sample(model, None, schedule, shape, use_clipped_model_output=True, **kw)
    scale = want.abs().max().item()
    assert (ref - want).abs().max().item() <= 1e-5 * scale
    default = reference_sample(model, None, schedule, shape, **kw)
    if schedule.clip_sample:  # the option changes the result where the clip bites
        assert (default - want).abs().max().item() > 1e-4 * scale
    for backend in BACKENDS:
        got = CPSampler(
            model,
            None,
            schedule,
            num_inference_steps=n,
            eta=eta,
            backend=backend,
            use_clipped_model_output=True,
        ).sample(shape, noise=noise, step_noise=kw["step_noise"])
        err = (got - want).abs().max().item() / scale
        print(f"{config} eta={eta} [{backend}]: rel err vs diffusers {err:.2e}")
        assert err <= 1e-5


def test_use_clipped_model_output_bad_type():
    s = NoiseSchedule()
    with pytest.raises(TypeError, match="use_clipped_model_output must be a bool"):
        CPSampler(ConvEps(), None, s, num_inference_steps=2, use_clipped_model_output=1)
    with pytest.raises(TypeError, match="use_clipped_model_output must be a bool"):
        reference_sample(
            ConvEps(), None, s, SHAPE, num_inference_steps=2, use_clipped_model_output="yes"
        )


# ---------------------------------------------------------------------------------------------
# Sampler vs reference on every backend: clip on, partly open gates, saturated elements
# ---------------------------------------------------------------------------------------------


def _protector(seed=3):
    w = 0.08 * torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(seed))
    return LinearProtector(w, bias=0.4).eval()


@pytest.mark.parametrize("clipped_eps", [False, True])
@pytest.mark.parametrize("mode", ["repel", "entropy"])
def test_sampler_equals_reference_on_every_backend(mode, clipped_eps):
    n, eta = 5, 0.6
    schedule = NoiseSchedule(clip_sample_range=1.2)
    gen = torch.Generator().manual_seed(21)
    noise = torch.randn(SHAPE, generator=gen)
    step_noise = torch.randn((n, *SHAPE), generator=gen)
    model, prot = ConvEps(), _protector()
    kw = dict(
        num_inference_steps=n,
        eta=eta,
        scale=60.0,
        alpha=0.3,
        mode=mode,
        use_clipped_model_output=clipped_eps,
    )
    ref, trace = reference_sample(
        model, prot, schedule, SHAPE, noise=noise, step_noise=step_noise, return_trace=True, **kw
    )
    ref64 = reference_sample(
        model.double(),
        prot.double(),
        schedule,
        SHAPE,
        noise=noise,
        step_noise=step_noise,
        dtype=torch.float64,
        **kw,
    )
    model.float(), prot.float()
    gates = trace.gate
    print(f"{mode}: open gates per step {gates.sum(1).tolist()} of {SHAPE[0]}")
    assert gates.any() and not gates.all()
    assert any(0 < int(row.sum()) < SHAPE[0] for row in gates)  # partly open within a step
    base = (ref.double() - ref64).abs().max().item()
    for backend in BACKENDS:
        fast, ftrace = CPSampler(model, prot, schedule, backend=backend, **kw).sample(
            SHAPE, noise=noise, step_noise=step_noise, return_trace=True
        )
        err = (fast - ref).abs().max().item()
        print(
            f"{mode} clipped_eps={clipped_eps} [{backend}]: |fast - ref| {err:.2e}, "
            f"ref vs fp64 {base:.2e}"
        )
        assert torch.equal(ftrace.gate, gates)
        assert err <= 1e-5 * max(ref.abs().max().item(), 1.0)


# ---------------------------------------------------------------------------------------------
# One guided step never raises |f| (linear protector: exact), while the old step did
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["repel", "attract", "entropy"])
def test_clipped_guided_step_never_raises_confidence(mode):
    """One step with d = √(1-ᾱ') ≈ 0.95 (t = 500 → 480 of 50 steps), most x̂0 pixels saturated.

    With ``f`` linear, guidance changes ``f(x_{t'})`` by ``-(sp - d·sa/s1)·(s1/sa)·<w, G>``
    whatever the clip did, so for every sample ``sign(f)·(f_guided - f_plain) <= 0`` at any scale;
    at a scale whose step does not overshoot ``f = 0``, averaged over many noises ``|f|`` drops.
    The pre-fix step (x̂0 = clip(x0g), ``ε + G``) raised it: where the clip cut the x̂0 move, its
    d·G term points towards confidence."""
    schedule = NoiseSchedule()
    n = 50
    k = list(schedule.timesteps(n).tolist()).index(500)
    t = 500
    coefs = ddim_coef_table(schedule, n, 0.0)[k]
    assert float(coefs[3]) > 0.9  # the ε̂ term matters
    B = 256
    gen = torch.Generator().manual_seed(8)
    w = 0.2 * torch.randn(SHAPE[1:], generator=gen)
    prot = LinearProtector(w, bias=1.0)
    ac = schedule.alphas_cumprod
    x0_true = (2 * torch.rand((B, *SHAPE[1:]), generator=gen) - 1).sign() * 0.98  # saturating
    eps_true = torch.randn((B, *SHAPE[1:]), generator=gen)
    x = ac[t].sqrt() * x0_true + (1 - ac[t]).sqrt() * eps_true
    o = eps_true + 0.3 * torch.randn((B, *SHAPE[1:]), generator=gen)  # an imperfect model
    f = prot(x, None).detach()
    scale_t = torch.tensor(10.0) * coefs[1]  # a step that does not overshoot f = 0
    cseed, _, m = guidance.vjp_seed(f, scale_t, 0.4, mode)
    assert m.float().mean() > 0.5
    G = cseed.view(B, 1, 1, 1) * w  # the VJP of a linear protector
    plain = _update("torch", x, o, None, None, coefs)
    f_plain = prot(plain, None).detach()
    x0g = (x - coefs[1] * o) / coefs[0] - (coefs[1] / coefs[0]) * G
    assert (x0g.abs() > 1).float().mean() > 0.3  # the clip bites on many pixels
    for backend in BACKENDS:
        guided = _update(backend, x, o, G, None, coefs)
        f_g = prot(guided, None).detach()
        moved = torch.sign(f_plain) * (f_g - f_plain)
        print(
            f"{mode} [{backend}]: mean |f| plain {f_plain.abs().mean():.4f}, "
            f"guided {f_g.abs().mean():.4f}; max sign(f)·Δf {moved.max():.2e}"
        )
        assert (moved[m] <= 1e-5).all()
        assert f_g.abs().mean() < f_plain.abs().mean()
    # the pre-fix step: x̂0 = clip(x0g), ε̂ = ε + G
    sa, s1, sp, d = (float(v) for v in coefs[:4])
    old = sp * x0g.clamp(-1, 1) + d * (o + G)
    f_old = prot(old, None).detach()
    print(f"{mode}: old rule mean |f| {f_old.abs().mean():.4f}")
    assert f_old.abs().mean() > f_plain.abs().mean()


# ---------------------------------------------------------------------------------------------
# The gate: exact threshold, the same on every backend (issue 13)
# ---------------------------------------------------------------------------------------------


def _f32_neighbours(value: float, k: int = 3) -> torch.Tensor:
    v = torch.tensor(value, dtype=torch.float32)
    out = [v]
    up, down = v, v
    for _ in range(k):
        up = torch.nextafter(up, torch.tensor(math.inf))
        down = torch.nextafter(down, torch.tensor(-math.inf))
        out += [up, down]
    return torch.stack(out)


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.3, 0.45])
def test_gate_is_exact_at_the_boundary(alpha):
    tau = math.log((1 - alpha) / alpha)
    a = _f32_neighbours(tau)
    logits = torch.cat([a, -a])
    # the truth, in float64: q = sigmoid(|f|) > 1 - α, i.e. sigmoid(-|f|) < α
    fa = logits.double().abs().numpy()
    truth = torch.from_numpy(1.0 / (1.0 + np.exp(fa)) < alpha)
    assert truth.any() and not truth.all()  # both sides of the boundary are present
    assert torch.equal(guidance.gate(logits, alpha), truth)
    assert torch.equal(guidance.gate(logits.double(), alpha), truth)
    scale = torch.tensor(1.0)
    for backend in ("torch", "triton") if "triton" in BACKENDS else ("torch",):
        _, _, m = ops.guidance_seed(logits, scale, alpha, "repel", backend=backend)
        assert torch.equal(m, truth), backend
    t32 = guidance.gate_threshold_f32(alpha)
    assert t32 <= tau and float(torch.tensor(t32, dtype=torch.float32)) == t32
    # the reference's own gate (float64 comparison), through its trace
    prot = LinearProtector(torch.zeros(1, 1, 1))
    for f in logits.tolist():
        prot.bias = f
        _, trace = reference_sample(
            lambda x, t: torch.zeros_like(x),
            prot,
            NoiseSchedule(),
            (1, 1, 1, 1),
            num_inference_steps=1,
            scale=1.0,
            alpha=alpha,
            return_trace=True,
        )
        assert bool(trace.gate[0, 0]) == (1.0 / (1.0 + math.exp(abs(f))) < alpha)


@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("clipped_eps", [False, True])
def test_backward_of_the_rule_matches_autograd(p, clipped_eps):
    """The op's hand-written backward (``_torch.guided_update_backward``) equals autograd of
    the torch forward, with the clip active on some elements and both flags."""
    from cpsample_fast.ops import _torch as torch_impl

    coefs = _coefs(0.3, 0.4, eta=0.5)
    x, o, g = _mixed_case(coefs)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    gy = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10))
    leaves = [t.clone().requires_grad_(True) for t in (x, o, g, z)]
    out = ops.guided_update(
        *leaves,
        coefs,
        torch.tensor([0, 0, 0]),
        prediction_type=p,
        clip_sample=True,
        draw_noise=False,
        backend="torch",
        use_clipped_model_output=clipped_eps,
    )
    grads = torch.autograd.grad(out, leaves, gy)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref_out = torch_impl.guided_update(*ref_leaves, coefs, None, p, True, False, clipped_eps)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, gy)
    for name, a, b in zip(("x", "model_out", "guidance", "noise"), grads, ref_grads):
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(b.abs().max().item(), 1.0), (name, err)
    torch.library.opcheck(
        torch.ops.cpsample.guided_update.default,
        (*leaves, coefs, torch.tensor([0, 0, 0]), p, True, False, "torch", clipped_eps),
    )
