"""Pure-PyTorch fused ops: the specification the Triton, C++ and CUDA kernels are tested against.

Also the CPU fallback when no extension is built. Every function here is branch-free tensor
math without host synchronisation (coefficients and RNG state are device tensors), so it also
serves as the body of compiled code.
"""

from __future__ import annotations

import torch

from .. import guidance as _guidance
from .. import noise as _noise

PREDICTION_EPSILON = 0
PREDICTION_V = 1
PREDICTION_SAMPLE = 2


def _x0_eps(x, model_out, sa, s1, prediction_type):
    """The model's own ``(x̂0, ε)`` per prediction type (docs/CONTRACTS.md)."""
    if prediction_type == PREDICTION_EPSILON:
        return (x - s1 * model_out) / sa, model_out
    if prediction_type == PREDICTION_V:
        return sa * x - s1 * model_out, sa * model_out + s1 * x
    if prediction_type == PREDICTION_SAMPLE:
        return model_out, (x - sa * model_out) / s1
    raise ValueError(f"prediction_type must be 0, 1 or 2, got {prediction_type}")


def guided_update(
    x: torch.Tensor,  # [B, ...] float32, x_t
    model_out: torch.Tensor,  # [B, ...] float32, raw eps-model output
    guidance: torch.Tensor | None,  # [B, ...] float32 guidance term G, or None (G = 0)
    noise: torch.Tensor | None,  # [B, ...] float32 explicit z, or None
    coefs: torch.Tensor,  # [6] float32: (sa, s1, sp, d, sigma, clip_range)
    rng: torch.Tensor,  # [3] int64: (seed, step k, sample_offset)
    prediction_type: int,
    clip_sample: bool,
    draw_noise: bool,
    use_clipped_model_output: bool = False,
) -> torch.Tensor:
    """One fused CPSample/DDIM update ``x_t → x_{t'}`` (docs/CONTRACTS.md "The fused update").

    The clip-consistent rule: ``x0g = x0 - (s1/sa)·G``, ``x̂0 = clip(x0g)`` and, with clipping and
    guidance, ``ε̂ = ε - (sa/s1)·(x̂0 - clip(x0))`` (the guidance's shift of x̂0 that survived the
    clip); without clipping ``ε̂ = ε + G``; without guidance ``ε̂ = ε`` (diffusers' step). With
    ``use_clipped_model_output``, ``ε̂ = (x - sa·x̂0)/s1`` for every sample, as diffusers.
    Inputs are assumed validated (see ``ops.guided_update.check_guided_update_args``).

    Returns:
        float32 ``[B, ...]``: ``x_{t'} = sp·x̂0 + d·ε̂ + σ·z``.
    """
    sa, s1, sp, d, sigma, clip_range = coefs.unbind(0)
    x0, eps = _x0_eps(x, model_out, sa, s1, prediction_type)
    x0_hat = x0
    if guidance is not None:
        # == (x - s1·(ε + G))/sa, without cancelling two large terms when G dominates.
        x0_hat = x0 - (s1 / sa) * guidance
    if clip_sample:
        x0_hat = torch.clamp(x0_hat, -clip_range, clip_range)
    if use_clipped_model_output:
        eps_hat = (x - sa * x0_hat) / s1
    elif guidance is None:
        eps_hat = eps
    elif clip_sample:
        delta = x0_hat - torch.clamp(x0, -clip_range, clip_range)
        eps_hat = eps - (sa / s1) * delta
    else:
        eps_hat = eps + guidance
    out = sp * x0_hat + d * eps_hat
    if noise is None and draw_noise:
        seed, step, sample_offset = rng.unbind(0)
        noise = _noise.step_noise(seed, step, x.shape, sample_offset)
    if noise is not None:
        out = out + sigma * noise
    return out


def guided_update_backward(
    grad_out: torch.Tensor,  # [B, ...] float32, dL/dx_{t'}
    x: torch.Tensor,  # [B, ...] float32, saved input
    model_out: torch.Tensor,  # [B, ...] float32, saved input
    guidance: torch.Tensor | None,  # [B, ...] float32 or None, saved input
    coefs: torch.Tensor,  # [6] float32
    prediction_type: int,
    clip_sample: bool,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``guided_update`` w.r.t. ``x``, ``model_out``, ``guidance`` and ``noise``.

    With ``A = clip(x0g)``, ``B = clip(x0)`` (clamp gradients pass where ``-c <= · <= c``, as
    ``torch.clamp``) and ``gy = dL/dx_{t'}``: ``dL/dε̂ = d·gy`` and ``dL/dA = sp·gy`` plus, by
    case, ``-(sa/s1)·dL/dε̂`` (clipped model output: ``ε̂ = (x - sa·A)/s1``, which also gives
    ``x`` a direct ``dL/dε̂/s1`` and the model's ε nothing) or ``-(sa/s1)·dL/dε̂`` with
    ``dL/dB = (sa/s1)·dL/dε̂`` (the clip-consistent ``ε̂ = ε - (sa/s1)(A - B)``); then
    ``dL/dG = -(s1/sa)·dL/dx0g`` (+ ``dL/dε̂`` when ``ε̂ = ε + G``) and the chain rule through
    ``(x0, ε)`` of the prediction type. Coefficients and the RNG state get no gradient.

    Returns:
        ``(grad_x, grad_model_out, grad_guidance, grad_noise)``, each like ``x``.
    """
    sa, s1, sp, d, sigma, clip_range = coefs.unbind(0)
    if prediction_type not in (PREDICTION_EPSILON, PREDICTION_V, PREDICTION_SAMPLE):
        raise ValueError(f"prediction_type must be 0, 1 or 2, got {prediction_type}")
    x0, _ = _x0_eps(x, model_out, sa, s1, prediction_type)
    x0g = x0 if guidance is None else x0 - (s1 / sa) * guidance
    g_eps_hat = grad_out * d  # dL/dε̂
    g_a = grad_out * sp  # dL/dA, A = clip(x0g)
    g_b = None  # dL/dB, B = clip(x0)
    grad_x_direct = None
    g_eps = g_eps_hat  # dL/dε of the model's own ε
    if use_clipped_model_output:  # ε̂ = (x - sa·A)/s1
        g_a = g_a - (sa / s1) * g_eps_hat
        grad_x_direct = g_eps_hat / s1
        g_eps = torch.zeros_like(g_eps_hat)
    elif guidance is not None and clip_sample:  # ε̂ = ε - (sa/s1)·(A - B)
        g_a = g_a - (sa / s1) * g_eps_hat
        g_b = (sa / s1) * g_eps_hat
    if clip_sample:
        g_a = g_a * ((x0g >= -clip_range) & (x0g <= clip_range))
        if g_b is not None:
            g_b = g_b * ((x0 >= -clip_range) & (x0 <= clip_range))
    g_x0 = g_a if g_b is None else g_a + g_b  # dL/dx0 of the model's own x0
    grad_g = -(s1 / sa) * g_a
    if guidance is not None and not clip_sample and not use_clipped_model_output:
        grad_g = grad_g + g_eps_hat  # ε̂ = ε + G
    if prediction_type == PREDICTION_EPSILON:  # x0 = (x - s1·o)/sa, ε = o
        grad_x = g_x0 / sa
        grad_o = g_eps - (s1 / sa) * g_x0
    elif prediction_type == PREDICTION_V:  # x0 = sa·x - s1·o, ε = sa·o + s1·x
        grad_x = sa * g_x0 + s1 * g_eps
        grad_o = sa * g_eps - s1 * g_x0
    else:  # x0 = o, ε = (x - sa·o)/s1
        grad_x = g_eps / s1
        grad_o = g_x0 - (sa / s1) * g_eps
    if grad_x_direct is not None:
        grad_x = grad_x + grad_x_direct
    grad_z = grad_out * sigma
    return grad_x, grad_o, grad_g, grad_z


def guidance_seed(
    logits: torch.Tensor,  # [B] protector logits f
    scale_t: torch.Tensor,  # 0-dim float32: s·√(1-ᾱ_t)
    alpha: float,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-sample VJP seed, confidence and gate (``cpsample_fast.guidance.guidance_seed``).

    Returns:
        ``(c [B] float32, q [B] float32, gate [B] bool)``.
    """
    return _guidance.guidance_seed(logits, scale_t, alpha, _guidance.MODES[mode])
