"""Pure-PyTorch fused ops: the specification the Triton, C++ and CUDA kernels are tested against.

Also the CPU fallback when no extension is built. Every function here is branch-free tensor
math without host synchronisation (coefficients and RNG state are device tensors), so it also
serves as the body of compiled code.
"""

from __future__ import annotations

import torch

from .. import guidance as _guidance
from .. import noise as _noise
from ..constants import PREDICTION_TYPE_IDS

PREDICTION_EPSILON = PREDICTION_TYPE_IDS["epsilon"]
PREDICTION_V = PREDICTION_TYPE_IDS["v_prediction"]
PREDICTION_SAMPLE = PREDICTION_TYPE_IDS["sample"]


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

    Guidance after the clip (docs/ALGORITHM.md §3 step 6): ``x̂0 = clip(x0) - (s1/sa)·G`` and
    ``ε̂ = ε + G``; the clip acts on the model's own x̂0 exactly as in diffusers' step, and the
    guidance moves the (x̂0, ε) pair consistently whatever the clip did. Without guidance this is
    diffusers' step bit for bit. With ``use_clipped_model_output``, ``ε̂ = (x - sa·x̂0)/s1``.
    Inputs are assumed validated (see ``ops._guided_update_op.check_guided_update_args``).

    Returns:
        float32 ``[B, ...]``: ``x_{t'} = sp·x̂0 + d·ε̂ + σ·z``.
    """
    sa, s1, sp, d, sigma, clip_range = coefs.unbind(0)
    # §3.1 x0 and eps from the model output
    x0, eps = _x0_eps(x, model_out, sa, s1, prediction_type)
    # §3.6a clip the model's own x0
    if clip_sample:
        x0 = torch.clamp(x0, -clip_range, clip_range)
    # §3.6b guidance after the clip: x0 - (s1/sa)·G == (x - s1·(ε + G))/sa for an unclipped x̂0,
    # without cancelling two large terms
    if guidance is not None:
        x0 = x0 - (s1 / sa) * guidance
        eps = eps + guidance
    # §3.6c use_clipped_model_output: eps from the final x0
    if use_clipped_model_output:
        eps = (x - sa * x0) / s1
    # §3.7 DDIM update: sp·x0 + d·eps + sigma·z
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
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``guided_update`` w.r.t. ``x``, ``model_out``, ``guidance`` and ``noise``.

    With ``gy = dL/dx_{t'}``: ``x̂0 = clip(x0) - (s1/sa)·G`` gets ``dL/dx̂0 = sp·gy`` and
    ``ε̂`` gets ``d·gy``; with ``use_clipped_model_output`` (``ε̂ = (x - sa·x̂0)/s1``) ``x̂0`` gets
    ``(sp - d·sa/s1)·gy``, ``x`` a direct ``(d/s1)·gy`` and the model's ε nothing. The clamp's
    gradient passes where ``-c <= x0 <= c`` (as ``torch.clamp``), ``dL/dG = -(s1/sa)·dL/dx̂0``
    (+ ``dL/dε̂`` when ``ε̂ = ε + G``), then the chain rule through ``(x0, ε)`` of the prediction
    type. Coefficients and the RNG state get no gradient.

    Returns:
        ``(grad_x, grad_model_out, grad_guidance, grad_noise)``, each like ``x``.
    """
    sa, s1, sp, d, sigma, clip_range = coefs.unbind(0)
    if prediction_type not in (PREDICTION_EPSILON, PREDICTION_V, PREDICTION_SAMPLE):
        raise ValueError(f"prediction_type must be 0, 1 or 2, got {prediction_type}")
    grad_x_direct = None
    # §3.7 DDIM update (backward): dL/dx̂0 = sp·gy, dL/dε̂ = d·gy, dL/dz = sigma·gy
    grad_z = grad_out * sigma
    # §3.6c use_clipped_model_output (backward): out = (sp - d·sa/s1)·x̂0 + (d/s1)·x
    if use_clipped_model_output:
        g_x0_hat = grad_out * (sp - d * sa / s1)
        grad_x_direct = grad_out * (d / s1)
        g_eps = torch.zeros_like(grad_out)
    else:
        g_x0_hat = grad_out * sp
        g_eps = grad_out * d  # dL/dε̂ = dL/dε (ε̂ = ε + G)
    # §3.6b guidance after the clip (backward): dL/dG
    grad_g = -(s1 / sa) * g_x0_hat
    if not use_clipped_model_output:
        grad_g = grad_g + g_eps
    g_x0 = g_x0_hat  # dL/dx0 of the model's own x0
    # §3.6a clip the model's own x0 (backward): the clamp passes the gradient inside ±c
    if clip_sample:
        # Recompute the model's x̂0 (noise and G do not enter it) only to know where the clamp
        # was active.
        x0, _ = _x0_eps(x, model_out, sa, s1, prediction_type)
        g_x0 = g_x0 * ((x0 >= -clip_range) & (x0 <= clip_range))
    # §3.1 x0 and eps from the model output (backward): the chain rule per prediction type
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
    return grad_x, grad_o, grad_g, grad_z


def guidance_seed(
    logits: torch.Tensor,  # [B] protector logits f
    scale_t: torch.Tensor,  # 0-dim float32: s·√(1-ᾱ_t)
    alpha: float,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-sample VJP seed, confidence and gate (``cpsample_fast.guidance.vjp_seed``).

    Returns:
        ``(c [B] float32, q [B] float32, gate [B] bool)``.
    """
    return _guidance.vjp_seed(logits, scale_t, alpha, _guidance.MODES[mode])


def dpm_update(
    x: torch.Tensor,  # [B, ...] float32, x_t
    model_out: torch.Tensor,  # [B, ...] float32, raw eps-model output
    guidance: torch.Tensor | None,  # [B, ...] float32 guidance term G, or None (G = 0)
    x0_prev: torch.Tensor,  # [B, ...] float32, the previous step's x0
    coefs: torch.Tensor,  # [7] float32: (alpha_s, sigma_s, A, B, C, R, clip_range)
    prediction_type: int,
    clip_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step (docs/CONTRACTS.md "The multistep update").

    ``x0`` from the model output (ε: ``(x - σ_s·o)/α_s``, v: ``α_s·x - σ_s·o``, sample: ``o``),
    guided ``x0 - (σ_s/α_s)·G`` and clipped when ``clip_sample``; then
    ``x_{t'} = (A·x - B·x0) - C·(R·(x0 - x0_prev))`` in diffusers' operation order.

    Returns:
        ``(x_{t'}, x0)``, float32 like ``x``.
    """
    alpha_s, sigma_s, A, B, C, R, clip_range = coefs.unbind(0)
    # §3.1 x0 from the model output
    if prediction_type == PREDICTION_EPSILON:
        x0 = (x - sigma_s * model_out) / alpha_s
    elif prediction_type == PREDICTION_V:
        x0 = alpha_s * x - sigma_s * model_out
    elif prediction_type == PREDICTION_SAMPLE:
        x0 = model_out.clone()
    else:
        raise ValueError(f"prediction_type must be 0, 1 or 2, got {prediction_type}")
    # §3.6a clip the model's own x0
    if clip_sample:
        x0 = torch.clamp(x0, -clip_range, clip_range)
    # §3.6b guidance after the clip: x0 - (σ_s/α_s)·G
    if guidance is not None:
        x0 = x0 - (sigma_s / alpha_s) * guidance
    # DPM multistep update, in diffusers' operation order
    out = (A * x - B * x0) - C * (R * (x0 - x0_prev))
    return out, x0
