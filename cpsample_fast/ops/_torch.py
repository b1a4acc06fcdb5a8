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
) -> torch.Tensor:
    """One fused CPSample/DDIM update ``x_t → x_{t'}`` (SPEC §3 steps 5–7; CONTRACTS formula).

    Inputs are assumed validated (see ``ops.guided_update.check_guided_update_args``).

    Returns:
        float32 ``[B, ...]``: ``x_{t'} = sp·x̂0 + d·ε̂ + σ·z``.
    """
    sa, s1, sp, d, sigma, clip_range = coefs.unbind(0)
    if prediction_type == PREDICTION_EPSILON:
        eps = model_out
        x0 = (x - s1 * model_out) / sa
    elif prediction_type == PREDICTION_V:
        x0 = sa * x - s1 * model_out
        eps = sa * model_out + s1 * x
    elif prediction_type == PREDICTION_SAMPLE:
        x0 = model_out
        eps = (x - sa * model_out) / s1
    else:
        raise ValueError(f"prediction_type must be 0, 1 or 2, got {prediction_type}")
    if guidance is not None:
        eps = eps + guidance
        # == (x - s1·ε̂)/sa, without cancelling two large terms when G dominates.
        x0 = x0 - (s1 / sa) * guidance
    if clip_sample:
        x0 = torch.clamp(x0, -clip_range, clip_range)
    out = sp * x0 + d * eps
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``guided_update`` w.r.t. ``x``, ``model_out``, ``guidance`` and ``noise``.

    The update is linear in each input except for the clamp, whose gradient passes where
    ``-c <= x̂0 <= c`` (as ``torch.clamp``). With ``(∂x0/∂x, ∂x0/∂o, ∂ε/∂x, ∂ε/∂o)`` per
    prediction type, ``∂x̂0/∂G = -s1/sa`` and ``∂ε̂/∂G = 1``:
    ``gx = sp·m·gy·∂x0/∂x + d·gy·∂ε/∂x`` (likewise for ``o``), ``gG = -(s1/sa)·sp·m·gy + d·gy``
    and ``gz = σ·gy``. Coefficients and the RNG state get no gradient.

    Returns:
        ``(grad_x, grad_model_out, grad_guidance, grad_noise)``, each like ``x``.
    """
    sa, s1, sp, d, sigma, clip_range = coefs.unbind(0)
    if prediction_type not in (PREDICTION_EPSILON, PREDICTION_V, PREDICTION_SAMPLE):
        raise ValueError(f"prediction_type must be 0, 1 or 2, got {prediction_type}")
    g_x0 = grad_out * sp  # dL/dx̂0
    if clip_sample:
        # Recompute x̂0 (noise does not enter it) only to know where the clamp was active.
        if prediction_type == PREDICTION_EPSILON:
            x0 = (x - s1 * model_out) / sa
        elif prediction_type == PREDICTION_V:
            x0 = sa * x - s1 * model_out
        else:
            x0 = model_out
        if guidance is not None:
            x0 = x0 - (s1 / sa) * guidance
        g_x0 = g_x0 * ((x0 >= -clip_range) & (x0 <= clip_range))
    g_eps = grad_out * d  # dL/dε̂
    if prediction_type == PREDICTION_EPSILON:  # x0 = (x - s1·o)/sa, ε = o
        grad_x = g_x0 / sa
        grad_o = g_eps - (s1 / sa) * g_x0
    elif prediction_type == PREDICTION_V:  # x0 = sa·x - s1·o, ε = sa·o + s1·x
        grad_x = sa * g_x0 + s1 * g_eps
        grad_o = sa * g_eps - s1 * g_x0
    else:  # x0 = o, ε = (x - sa·o)/s1
        grad_x = g_eps / s1
        grad_o = g_x0 - (sa / s1) * g_eps
    grad_g = g_eps - (s1 / sa) * g_x0
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
