"""SPEC.md §3 steps 2–5 as plain tensor math: confidence, gate, mode weight and the VJP seed.

Everything here is elementwise over the batch, branch-free and free of host synchronisation, so
the same functions serve the reference (eagerly), the fast sampler (under ``torch.compile``) and
the ``cpsample::guidance_seed`` op's torch kernel.
"""

from __future__ import annotations

import torch

MODES = ("repel", "attract", "entropy")
_MODE_IDS = {name: i for i, name in enumerate(MODES)}


def mode_id(mode: str) -> int:
    """Integer id of a guidance mode (the form kernels take)."""
    try:
        return _MODE_IDS[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}") from None


def check_alpha(alpha: float) -> float:
    """Validate the gate threshold α ∈ (0, 0.5] (SPEC §3 step 3)."""
    alpha = float(alpha)
    if not (0.0 < alpha <= 0.5):
        raise ValueError(f"alpha must lie in (0, 0.5], got {alpha}")
    return alpha


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """``q = sigmoid(|f|) = max(r, 1 - r)`` (SPEC §3 step 2). ``logits``: ``[B]``."""
    return torch.sigmoid(logits.abs())


def gate(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """``m = 1[q > 1 - α]``, i.e. ``min(r, 1 - r) < α`` (SPEC §3 step 3), as a bool ``[B]``.

    Evaluated as ``sigmoid(-|f|) < α``: the small side of the sigmoid keeps full float precision
    at α = 0.001, where ``1 - α`` next to ``q ≈ 1`` would lose digits.
    """
    return torch.sigmoid(-logits.abs()) < alpha


def mode_weight(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """The factor ``w(f)`` of ``g = w(f) · sign(f) · ∇_x f`` for each mode (SPEC §3 step 4).

    - ``repel``:   ``w = 1 - q``  (``g = ∇_x log q``)
    - ``attract``: ``w = q``      (``g = -∇_x log(1 - q)``)
    - ``entropy``: ``w = |f| · r · (1 - r)``  (``g = -∇_x H(r)``)
    """
    a = logits.abs()
    if mode == "repel":
        return torch.sigmoid(-a)
    if mode == "attract":
        return torch.sigmoid(a)
    if mode == "entropy":
        r = torch.sigmoid(logits)
        return a * r * (1.0 - r)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def guidance_seed(
    logits: torch.Tensor,  # [B] protector logits f
    scale_t: torch.Tensor | float,  # s · √(1 - ᾱ_t), scalar
    alpha: float,
    mode: str = "repel",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample VJP seed ``c_b = s·√(1-ᾱ_t)·m_b·w(f_b)·sign(f_b)`` (SPEC §3 step 5).

    The vector-Jacobian product of the logits with ``c`` is the whole guidance term
    ``s·√(1-ᾱ_t)·m·g`` that is added to ε, because each logit depends on its own sample only.

    Returns:
        ``(c, q, m)``: the seed ``[B]`` (float32), the confidence ``[B]`` and the gate ``[B]``
        (bool).
    """
    f = logits.float()
    q = confidence(f)
    m = gate(f, alpha)
    w = mode_weight(f, mode)
    c = scale_t * m.to(f.dtype) * w * torch.sign(f)
    return c, q, m
