"""docs/ALGORITHM.md §3 steps 2–5 as plain tensor math: confidence, gate, mode weight and the VJP
seed.

Everything here is elementwise over the batch, branch-free and free of host synchronisation, so
the same functions serve the reference (eagerly), the fast sampler (under ``torch.compile``) and
the ``cpsample::guidance_seed`` op's torch kernel.
"""

from __future__ import annotations

import math
import struct

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
    """Validate the gate threshold α ∈ (0, 0.5] (docs/ALGORITHM.md §3 step 3)."""
    alpha = float(alpha)
    if not (0.0 < alpha <= 0.5):
        raise ValueError(f"alpha must lie in (0, 0.5], got {alpha}")
    return alpha


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """``q = sigmoid(|f|) = max(r, 1 - r)`` (docs/ALGORITHM.md §3 step 2). ``logits``: ``[B]``."""
    return torch.sigmoid(logits.abs())


def gate_threshold(alpha: float) -> float:
    """``τ = logit(1 - α) = log((1 - α)/α)`` in float64: ``q > 1 - α  ⇔  |f| > τ``."""
    alpha = check_alpha(alpha)
    return math.log((1.0 - alpha) / alpha)


def gate_threshold_f32(alpha: float) -> float:
    """The largest float32 ``τ32 ≤ τ``: for every float32 ``|f|``, ``|f| > τ32  ⇔  |f| > τ``.

    (No float32 lies in ``(τ32, τ]`` unless it is ``τ`` itself, in which case ``τ32 = τ``.)
    A Python float that is exactly a float32, so passing it to a float32 comparison or a Triton
    ``fp32`` argument does not round it again.
    """
    tau = gate_threshold(alpha)  # >= 0 since α <= 0.5
    t32 = struct.unpack("<f", struct.pack("<f", tau))[0]  # round to nearest
    if t32 > tau:  # one float32 step down (positive floats: the bit pattern minus one)
        bits = struct.unpack("<I", struct.pack("<f", t32))[0]
        t32 = struct.unpack("<f", struct.pack("<I", bits - 1))[0]
    return t32


def gate(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """``m = 1[q > 1 - α]`` (docs/ALGORITHM.md §3), as a bool ``[B]``.

    Evaluated exactly as ``|f| > τ = log((1 - α)/α)`` with ``τ`` from the host in float64
    (``gate_threshold_f32`` for float32 logits), not as ``sigmoid(-|f|) < α``: the float32
    sigmoid differs by an ulp between devices and libraries (Sleef on CPU, libdevice or the
    approximate ``ex2`` in a Triton kernel on GPU), which can flip a gate right at the boundary.
    The threshold form gives the same gate on every device and backend.
    """
    a = logits.abs()
    if a.dtype == torch.float64:
        return a > gate_threshold(alpha)
    return a.float() > gate_threshold_f32(alpha)


def mode_weight(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """The factor ``w(f)`` of ``g = w(f) · sign(f) · ∇_x f`` for each mode (docs/ALGORITHM.md §3
    step 4).

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


def vjp_seed(
    logits: torch.Tensor,  # [B] protector logits f
    scale_t: torch.Tensor | float,  # s · √(1 - ᾱ_t), scalar
    alpha: float,
    mode: str = "repel",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample VJP seed ``c_b = s·√(1-ᾱ_t)·m_b·w(f_b)·sign(f_b)`` (docs/ALGORITHM.md §3 step 5).

    The vector-Jacobian product of the logits with ``c`` is the whole guidance term
    ``s·√(1-ᾱ_t)·m·g`` that is added to ε, because each logit depends on its own sample only.

    The plain-math form (``scale_t`` a float or a tensor, ``mode`` a name); the op
    :func:`cpsample_fast.ops.guidance_seed` is its checked, backend-dispatched counterpart.

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
