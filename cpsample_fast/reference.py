"""The reference CPSample loop: docs/ALGORITHM.md §3 in plain eager PyTorch — the specification in
code.

Written the way a straightforward research implementation would be: ``torch.autograd.grad`` of
each mode's objective (not the closed-form VJP seed the fast path uses, so the two check each
other), the gate read on the host (``if m.any():``), every model output checked at every step.
Nothing here imports from ``cpsample_fast.ops``: it stays an independent check of the fast paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import noise as _noise
from .model_caller import ModelCaller
from .sampling_options import resolve_sampling_options
from .solvers import dpm_first_order, dpm_sigmas, dpm_timesteps
from .trace import SamplingTrace
from .validation import check_model_output, check_noise_args, check_protector_output, check_shape


def objective(f: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample objective whose x-gradient is the mode's guidance g (docs/ALGORITHM.md §3 step 4).

    repel: ``log q``; attract: ``-log(1 - q)``; entropy: ``-H(r)``, with ``q = sigmoid(|f|)``.
    """
    if mode == "repel":
        return F.logsigmoid(f.abs())
    if mode == "attract":
        return -F.logsigmoid(-f.abs())
    if mode == "entropy":
        r = torch.sigmoid(f)
        return r * F.logsigmoid(f) + (1.0 - r) * F.logsigmoid(-f)
    raise ValueError(f"unknown mode {mode!r}")


def _check_finite(tensor: torch.Tensor, what: str, step: int, t: int) -> None:
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"{what} produced NaN/inf at step {step} (t={t}); check the model and its dtype"
        )


def _guidance_term(prot_call, x, t_batch, k, t, s1, *, scale, alpha, mode, trace):
    """docs/ALGORITHM.md §3 steps 2–5 at one step: the guidance term ``G = s·s1·m·g``, or None
    when the gate is shut for every sample (``s1``: the noise level, √(1-ᾱ_t) or the solver's
    σ_t). Records logits, confidence and gate in ``trace`` when given."""
    B = x.shape[0]
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        f = check_protector_output(prot_call(x_in, t_batch), B, k, t).to(x.dtype)
        _check_finite(f, "protector", k, t)
        r = torch.sigmoid(f)
        # q = max(r, 1 - r) > 1 - α  <=>  |f| > log((1 - α) / α), compared exactly in float64
        # (docs/CONTRACTS.md "Guidance": the gate is exact, on every device)
        m = f.double().abs() > math.log((1 - alpha) / alpha)
        if trace is not None:
            trace.logits[k] = f.detach().float()
            trace.confidence[k] = torch.maximum(r, 1 - r).detach().float()
            trace.gate[k] = m
        if not m.any():
            return None
        (g,) = torch.autograd.grad(objective(f, mode).sum(), x_in)
        mask = m.to(x.dtype).view(B, *([1] * (x.dim() - 1)))
        return scale * s1 * mask * g.to(x.dtype)


def reference_sample(
    eps_model,
    protector,
    schedule,
    shape,
    *,
    num_inference_steps: int,
    eta: float = 0.0,
    scale: float | None = None,
    alpha: float | None = None,
    mode: str = "repel",
    seed: int = 0,
    noise: torch.Tensor | None = None,
    step_noise: torch.Tensor | None = None,
    sample_offset: int = 0,
    return_trace: bool = False,
    device=None,
    dtype: torch.dtype = torch.float32,
    guidance_range: tuple[int, int] | None = None,
    callback=None,
    use_clipped_model_output: bool = False,
    solver: str = "ddim",
    final_sigmas_type: str = "zero",
):
    """Protected DDIM sampling, docs/ALGORITHM.md §3 steps 1–7, eagerly and one obvious operation
    at a time.

    Args:
        eps_model: ``eps_model(x [B,C,H,W], t int64 [B]) -> [B,C,H,W]`` (ε, v or x0 according
            to ``schedule.prediction_type``).
        protector: ``protector(x, t) -> logits [B]``, or None for plain DDIM.
        schedule: a ``NoiseSchedule``.
        shape: ``(B, C, H, W)``.
        num_inference_steps: number of DDIM steps.
        eta: DDIM η (0 = deterministic DDIM, 1 over all T steps = DDPM ancestral).
        scale: guidance scale s (0 = plain DDIM); required with a protector (paper: 1000).
        alpha: gate threshold α ∈ (0, 0.5]; required with a protector (paper: 0.001).
        mode: ``"repel"`` (default), ``"attract"`` or ``"entropy"``.
        seed: seed of the counter-based noise (docs/ALGORITHM.md §4) when ``noise``/``step_noise``
        are absent.
        noise: explicit initial ``x_T`` ``[B, C, H, W]``.
        step_noise: explicit per-step noise ``z`` ``[steps, B, C, H, W]``.
        sample_offset: global index of the first sample (for the counter-based noise).
        return_trace: also return a :class:`SamplingTrace`.
        device: where to run (default: the noise's device, else CPU).
        dtype: dtype of x_t and the update (float64 for a high-precision reference).
        guidance_range: optional inclusive ``(t_min, t_max)``; guidance only at those timesteps.
        callback: optional ``callback(step, t, x)`` after every step.
        use_clipped_model_output: as diffusers' ``DDIMScheduler.step``: the direction term's ε̂
            is re-derived from the clipped x̂0, ``(x_t - √ᾱ_t·x̂0) / √(1-ᾱ_t)``, for every sample.
        solver: ``"ddim"`` (default) or ``"dpmsolver++"``: diffusers' DPMSolverMultistepScheduler
            with its defaults (second order, ``η = 0``, ``num_inference_steps >= 2``; see
            ``cpsample_fast.solvers``); the guidance enters as in DDIM, through x̂0.
        final_sigmas_type: DPM-Solver++ only, as diffusers' option: ``"zero"`` (default: the last
            step lands on σ = 0, first order) or ``"sigma_min"`` (it lands on σ at t = 0; the
            last step stays second order from 15 steps on).

    Returns:
        The final images ``[B, C, H, W]``, and the trace when ``return_trace``.
    """
    opts = resolve_sampling_options(
        protector, schedule, num_inference_steps=num_inference_steps, eta=eta, scale=scale,
        alpha=alpha, mode=mode, solver=solver, use_clipped_model_output=use_clipped_model_output,
        guidance_range=guidance_range, final_sigmas_type=final_sigmas_type,
    )  # fmt: skip
    shape = check_shape(shape)
    check_noise_args(shape, num_inference_steps, noise, step_noise)
    if device is None:
        device = noise.device if noise is not None else torch.device("cpu")
    loop = _reference_ddim if opts.solver == "ddim" else _reference_dpmsolver
    return loop(
        eps_model, protector, schedule, shape, opts, num_inference_steps=num_inference_steps,
        seed=seed, noise=noise, step_noise=step_noise, sample_offset=sample_offset,
        return_trace=return_trace, device=device, dtype=dtype, callback=callback,
    )  # fmt: skip


def _initial_x(noise, seed, shape, sample_offset, device, dtype) -> torch.Tensor:
    """x_T: the explicit ``noise``, else the counter-based initial noise (docs/ALGORITHM.md §4)."""
    if noise is not None:
        return noise.to(device=device, dtype=dtype).clone()
    return _noise.initial_noise(seed, shape, sample_offset=sample_offset, device=device).to(dtype)


def _model_output(eps_call, x, t_batch, k, t, dtype) -> torch.Tensor:
    """docs/ALGORITHM.md §3 step 1: the model's raw output, checked, in the loop's dtype."""
    out = check_model_output(eps_call(x, t_batch), x, k, t).to(dtype)
    _check_finite(out, "eps_model", k, t)
    return out


def _reference_ddim_step(x, out, guidance, z, a_t, a_prev, *, eta, schedule,
                         use_clipped_model_output):  # fmt: skip
    """docs/ALGORITHM.md §3 steps 1, 6 and 7 for one DDIM step, as ``DDIMScheduler.step``
    computes them: ``out`` is the model's raw output, ``guidance`` the term G of steps 2–5 (None:
    G = 0), ``z`` the step noise (None when η = 0), ``a_t`` = ᾱ_t and ``a_prev`` = ᾱ'.

    Its stages carry the markers that ``scripts/check_copies.py`` checks in every copy of the step
    (``ops/_torch.py``, ``ops/_triton.py``, ``csrc/cpsample/step_math.h``).
    """
    b_t = 1 - a_t
    b_prev = 1 - a_prev
    # §3.1 x0 and eps from the model output (per prediction_type, as DDIMScheduler.step)
    if schedule.prediction_type == "epsilon":
        x0 = (x - b_t ** (0.5) * out) / a_t ** (0.5)
        eps = out
    elif schedule.prediction_type == "sample":
        x0 = out
        eps = (x - a_t ** (0.5) * x0) / b_t ** (0.5)
    elif schedule.prediction_type == "v_prediction":
        x0 = (a_t**0.5) * x - (b_t**0.5) * out
        eps = (a_t**0.5) * out + (b_t**0.5) * x
    else:
        raise ValueError(f"unknown prediction_type {schedule.prediction_type!r}")

    # §3.6a clip the model's own x0, exactly as diffusers does
    x0_hat = x0
    if schedule.clip_sample:
        r_clip = schedule.clip_sample_range
        x0_hat = x0_hat.clamp(-r_clip, r_clip)
    # §3.6b guidance after the clip: x̂0 moves by -(√(1-ᾱ_t)/√ᾱ_t)·G and ε by +G whatever the
    # clip did, so the guidance acts alike with or without clipping; G = 0 is diffusers' step
    eps_hat = eps
    if guidance is not None:
        x0_hat = x0_hat - (b_t ** (0.5) / a_t ** (0.5)) * guidance
        eps_hat = eps + guidance
    # §3.6c use_clipped_model_output: ε̂ re-derived from the final x̂0
    if use_clipped_model_output:
        eps_hat = (x - a_t ** (0.5) * x0_hat) / b_t ** (0.5)

    # §3.7 DDIM update (DDIMScheduler._get_variance and step)
    variance = (b_prev / b_t) * (1 - a_t / a_prev)
    std = eta * variance ** (0.5)
    direction = (1 - a_prev - std**2) ** (0.5) * eps_hat
    x = a_prev ** (0.5) * x0_hat + direction
    if z is not None:
        x = x + std * z
    return x


def _reference_ddim(
    eps_model, protector, schedule, shape, opts, *, num_inference_steps, seed, noise, step_noise,
    sample_offset, return_trace, device, dtype, callback,
):  # fmt: skip
    """The DDIM loop: per step the model (§3 step 1), the guidance term (steps 2–5) and
    :func:`_reference_ddim_step` (steps 1, 6, 7), with the noise of §4."""
    B, n = shape[0], num_inference_steps
    T = int(schedule.num_train_timesteps)
    eps_call = ModelCaller(eps_model)
    prot_call = ModelCaller(protector) if protector is not None else None
    timesteps = schedule.timesteps(n)
    alphas_cumprod = schedule.alphas_cumprod.to(device=device, dtype=dtype)
    final_alpha = schedule.final_alpha_cumprod.to(device=device, dtype=dtype)
    x = _initial_x(noise, seed, shape, sample_offset, device, dtype)
    trace = SamplingTrace.empty(timesteps, B, device) if return_trace else None

    for k in range(n):
        t = int(timesteps[k])
        t_prev = t - T // n
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[t_prev] if t_prev >= 0 else final_alpha
        t_batch = torch.full((B,), t, dtype=torch.long, device=device)
        out = _model_output(eps_call, x, t_batch, k, t, dtype)
        guidance = None  # steps 2-5: G = s·√(1-ᾱ_t)·m·g
        if opts.guides_at(t, protector is not None):
            guidance = _guidance_term(prot_call, x, t_batch, k, t, (1 - a_t) ** (0.5),
                                      scale=opts.scale, alpha=opts.alpha, mode=opts.mode,
                                      trace=trace)  # fmt: skip
        z = None
        if opts.eta > 0:
            if step_noise is not None:
                z = step_noise[k].to(device=device, dtype=dtype)
            else:
                z = _noise.step_noise(seed, k, shape, sample_offset=sample_offset, device=device)
            z = z.to(dtype)
        x = _reference_ddim_step(
            x, out, guidance, z, a_t, a_prev, eta=opts.eta, schedule=schedule,
            use_clipped_model_output=opts.use_clipped_model_output,
        )  # fmt: skip
        _check_finite(x, "the update", k, t)
        if callback is not None:
            callback(k, t, x)

    return (x, trace) if return_trace else x


def _reference_dpmsolver(
    eps_model, protector, schedule, shape, opts, *, num_inference_steps, seed, noise, step_noise,
    sample_offset, return_trace, device, dtype, callback,
):  # fmt: skip
    """Protected DPM-Solver++(2M), diffusers' ``DPMSolverMultistepScheduler`` defaults, written out.

    Each step: the model's data prediction x̂0 (``convert_model_output``); the protector at x_t
    and the guidance term ``G = s·σ_t·m·g`` exactly as in the DDIM loop, moving x̂0 by
    ``-(σ_t/α_t)·G`` (ε̂ = ε + G in the solver's own α_t, σ_t); x̂0 clipped when the schedule
    clips (the solver reads x̂0 only, so this is the clip-consistent rule of docs/ALGORITHM.md §3
    step 6 by construction); then the first-order update (step 0 and the last step) or the
    second-order midpoint update with the previous step's x̂0.
    """
    del step_noise  # η = 0: the solver draws no step noise
    B = shape[0]
    n = num_inference_steps
    eps_call = ModelCaller(eps_model)
    prot_call = ModelCaller(protector) if protector is not None else None
    timesteps = dpm_timesteps(schedule, n)
    final = opts.final_sigmas_type
    sigmas = dpm_sigmas(schedule, n, final).to(device=device, dtype=dtype)  # [n + 1]
    first_order = dpm_first_order(n, final)

    def alpha_sigma(sigma):  # diffusers' _sigma_to_alpha_sigma_t
        a = 1 / ((sigma**2 + 1) ** 0.5)
        return a, sigma * a

    def lam(sigma):
        a, s = alpha_sigma(sigma)
        return torch.log(a) - torch.log(s)

    x = _initial_x(noise, seed, shape, sample_offset, device, dtype)
    trace = SamplingTrace.empty(timesteps, B, device) if return_trace else None
    x0_prev = None
    for k in range(n):
        t = int(timesteps[k])
        t_batch = torch.full((B,), t, dtype=torch.long, device=device)
        alpha_s, sigma_s = alpha_sigma(sigmas[k])

        out = _model_output(eps_call, x, t_batch, k, t, dtype)
        # §3.1 x0 from the model output (the data prediction, as convert_model_output)
        if schedule.prediction_type == "epsilon":
            x0 = (x - sigma_s * out) / alpha_s
        elif schedule.prediction_type == "sample":
            x0 = out
        else:  # v_prediction
            x0 = alpha_s * x - sigma_s * out
        # §3.6a clip the model's own x0
        if schedule.clip_sample:
            x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)

        # 2-5. protector, gate, G = s·σ_t·m·g (as in the DDIM loop)
        if opts.guides_at(t, protector is not None):
            guidance = _guidance_term(prot_call, x, t_batch, k, t, sigma_s, scale=opts.scale,
                                      alpha=opts.alpha, mode=opts.mode, trace=trace)  # fmt: skip
            # §3.6b guidance after the clip: ε̂ = ε + G moves x̂0 by -(σ_t/α_t)·G
            if guidance is not None:
                x0 = x0 - (sigma_s / alpha_s) * guidance

        # DPM multistep update (dpm_solver_first_order_update / the 2M midpoint update)
        alpha_t, sigma_t = alpha_sigma(sigmas[k + 1])
        h = lam(sigmas[k + 1]) - lam(sigmas[k])
        if first_order[k]:
            x = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            r0 = (lam(sigmas[k]) - lam(sigmas[k - 1])) / h
            D0, D1 = x0, (1.0 / r0) * (x0 - x0_prev)
            x = (
                (sigma_t / sigma_s) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            )
        x0_prev = x0
        _check_finite(x, "the update", k, t)
        if callback is not None:
            callback(k, t, x)

    return (x, trace) if return_trace else x
