"""``cpsample::guidance_seed``: logits → (VJP seed c, confidence q, gate m) as a torch.library op.

Wraps ``cpsample_fast.guidance.vjp_seed`` (docs/ALGORITHM.md §3 steps 2–5). Backends:
``"torch"`` (the math of ``guidance.py``) and ``"triton"`` (one fused kernel in ``_triton.py``).
The compiled extension has no kernel for this ``[B]``-sized op, so ``"cpp"``/``"cuda"`` run the
torch version, and ``"auto"`` picks triton where it runs natively (CUDA tensors), else torch.
"""

from __future__ import annotations

import torch

from .. import guidance as _guidance
from . import _torch
from . import _triton as _triton_impl
from ._backends import BACKENDS, resolve_backend


def check_guidance_seed_args(
    logits: torch.Tensor, scale_t: torch.Tensor, alpha: float, mode: int, backend: str
) -> None:
    """Validate the op's arguments; raise ``TypeError``/``ValueError`` naming the bad one."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"guidance_seed: logits must be a tensor [B], got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"guidance_seed: logits must be a float tensor [B], got {logits.dtype}")
    if logits.dim() != 1:
        raise ValueError(f"guidance_seed: logits must have shape [B], got {tuple(logits.shape)}")
    if not isinstance(scale_t, torch.Tensor):
        raise TypeError(
            "guidance_seed: scale_t must be a float32 0-dim tensor (s·√(1-ᾱ_t)); a Python float "
            f"would recompile compiled code every step, got {type(scale_t).__name__}"
        )
    if scale_t.dtype != torch.float32 or scale_t.dim() != 0:
        raise TypeError(
            f"guidance_seed: scale_t must be a float32 0-dim tensor, got {scale_t.dtype} of shape "
            f"{tuple(scale_t.shape)}"
        )
    if scale_t.device != logits.device:
        raise ValueError(
            f"guidance_seed: scale_t must be on {logits.device} like logits, got {scale_t.device}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"guidance_seed: alpha must be a float, got {alpha!r}")
    _guidance.check_alpha(alpha)
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"guidance_seed: mode must be an int id, got {mode!r}")
    if not 0 <= mode < len(_guidance.MODES):
        raise ValueError(
            f"guidance_seed: mode must be 0..{len(_guidance.MODES) - 1} "
            f"({', '.join(_guidance.MODES)}), got {mode}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"guidance_seed: backend must be one of {BACKENDS}, got {backend!r}")


def _resolve(backend: str, device: torch.device) -> str:
    """Triton or torch: ``_C`` has no kernel for this ``[B]``-sized op, so cpp/cuda run torch."""
    if backend in ("cpp", "cuda"):
        return "torch"
    name = resolve_backend(backend, device)
    return name if name == "triton" else "torch"


@torch.library.custom_op(
    "cpsample::guidance_seed",
    mutates_args=(),
    schema=(
        "(Tensor logits, Tensor scale_t, float alpha, int mode, str backend) "
        "-> (Tensor, Tensor, Tensor)"
    ),
)
def _guidance_seed_op(logits, scale_t, alpha, mode, backend):
    # Checked once by the wrapper (eager) or the fake (tracing); the body trusts its arguments.
    if _resolve(backend, logits.device) == "triton":
        return _triton_impl.guidance_seed(logits, scale_t, alpha, mode)
    return _torch.guidance_seed(logits, scale_t, alpha, mode)  # fresh tensors, no aliasing


@_guidance_seed_op.register_fake
def _guidance_seed_fake(logits, scale_t, alpha, mode, backend):
    check_guidance_seed_args(logits, scale_t, alpha, mode, backend)
    c = logits.new_empty(logits.shape, dtype=torch.float32)
    return c, torch.empty_like(c), logits.new_empty(logits.shape, dtype=torch.bool)


def guidance_seed(
    logits: torch.Tensor,  # [B] protector logits f
    scale_t: torch.Tensor,  # [] float32: s·√(1-ᾱ_t), on logits' device
    alpha: float,
    mode: int | str = "repel",
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample VJP seed ``c_b = s·√(1-ᾱ_t)·m_b·w(f_b)·sign(f_b)`` (docs/ALGORITHM.md §3 steps
    2–5).

    Args:
        logits: ``[B]`` float protector logits.
        scale_t: float32 0-dim tensor ``s·√(1-ᾱ_t)`` on ``logits.device``.
        alpha: gate threshold in ``(0, 0.5]``.
        mode: "repel", "attract", "entropy" or its id 0/1/2 (``guidance.mode_id``).
        backend: "auto", "torch", "triton" (or "cpp"/"cuda", which run the torch version).

    Returns:
        ``(c [B] float32, q [B] float32, gate [B] bool)``.
    """
    if isinstance(mode, str):
        mode = _guidance.mode_id(mode)
    check_guidance_seed_args(logits, scale_t, alpha, mode, backend)
    return torch.ops.cpsample.guidance_seed(logits, scale_t, float(alpha), mode, backend)
