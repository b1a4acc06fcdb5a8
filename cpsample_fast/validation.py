"""Argument checks shared by the reference and the fast sampler.

Each check raises ``ValueError``/``TypeError`` naming the argument and what was expected, so bad
input fails before any model or kernel runs (docs/ALGORITHM.md §3, issue "Bad input").
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from .constants import SEED_LIMIT
from .guidance import MODES, check_alpha


def _as_int(value, error: Exception) -> int:
    """``value`` as a Python int if it is integral (int, numpy or 0-dim tensor int, not bool)."""
    if isinstance(value, bool):
        raise error
    try:
        return operator.index(value)
    except TypeError:
        raise error from None


def check_int(name: str, value, lo: int = 1) -> int:
    """An integer (not a bool) ``>= lo`` as a Python int; ValueError naming ``name`` otherwise."""
    value = _as_int(value, ValueError(f"{name} must be an int >= {lo}, got {value!r}"))
    if value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def check_seed(name: str, value) -> int:
    """A seed: an integer in ``[0, 2**64)`` (a 64-bit Philox key), everywhere in the package."""
    value = _as_int(value, TypeError(f"{name} must be an int, got {value!r}"))
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def check_sampling_args(
    schedule,
    *,
    num_inference_steps: int,
    eta: float,
    scale: float,
    alpha: float,
    mode: str,
) -> None:
    """Validate the scalar options common to every sampler."""
    T = int(schedule.num_train_timesteps)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if not (1 <= num_inference_steps <= T):
        raise ValueError(
            f"num_inference_steps must be in [1, {T}] (the schedule's num_train_timesteps), "
            f"got {num_inference_steps}"
        )
    for name, value in (("eta", eta), ("scale", scale)):
        if not (math.isfinite(float(value)) and float(value) >= 0.0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    check_alpha(alpha)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def resolve_guidance_args(protector, scale, alpha) -> tuple[float, float]:
    """``scale`` and ``alpha`` are required with a protector (docs/ALGORITHM.md §5 gives them no
    default).

    A protector passed without them would otherwise sample unprotected without a word; the
    paper pairs s = 1000 with α = 0.001. Without a protector they default to plain DDIM.
    """
    if protector is not None:
        if scale is None or alpha is None:
            missing = " and ".join(n for n, v in (("scale", scale), ("alpha", alpha)) if v is None)
            raise TypeError(
                f"{missing} must be given with a protector (the paper uses scale=1000, "
                "alpha=0.001); pass scale=0 for plain DDIM"
            )
        return float(scale), float(alpha)
    return (0.0 if scale is None else float(scale)), (0.5 if alpha is None else float(alpha))


def check_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """``shape`` must be ``(B, C, H, W)`` of positive ints."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence (B, C, H, W), got {shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be (B, C, H, W) with positive sizes, got {shape}")
    return shape


def check_noise_args(
    shape: tuple[int, ...],
    num_inference_steps: int,
    noise: torch.Tensor | None,
    step_noise: torch.Tensor | None,
) -> None:
    """Explicit ``noise`` must be ``shape``; ``step_noise`` must be ``[steps, *shape]``."""
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError("noise must be a floating-point torch.Tensor [B, C, H, W]")
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise contains NaN or inf; pass finite initial noise x_T")
    if step_noise is not None:
        want = (num_inference_steps, *shape)
        if not isinstance(step_noise, torch.Tensor) or not step_noise.is_floating_point():
            raise TypeError("step_noise must be a floating-point torch.Tensor [steps, B, C, H, W]")
        if tuple(step_noise.shape) != want:
            raise ValueError(
                f"step_noise must have shape [num_inference_steps, B, C, H, W] = {want}, "
                f"got {tuple(step_noise.shape)}"
            )
        if not bool(torch.isfinite(step_noise).all()):
            raise ValueError("step_noise contains NaN or inf; pass finite per-step noise z")


def _where(step: int | None, t: int | None) -> str:
    return "" if step is None else f" at step {step} (t={t})"


def check_model_output(out, x: torch.Tensor, step: int | None, t: int | None) -> torch.Tensor:
    """The eps-model must return a floating tensor of ``x``'s shape.

    Only shapes, types and dtypes are read, so the check costs nothing under ``torch.compile``
    (it is evaluated while tracing) and never synchronises with the device.
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"eps_model must return a torch.Tensor, got {type(out).__name__}{_where(step, t)}; "
            "wrap diffusers models, e.g. lambda x, t: unet(x, t).sample"
        )
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(
            f"eps_model returned shape {tuple(out.shape)} for input {tuple(x.shape)}"
            f"{_where(step, t)}; it must return the same shape as x (does `shape` match the model?)"
        )
    if not out.is_floating_point():
        raise TypeError(f"eps_model must return a floating-point tensor, got {out.dtype}")
    return out


def check_protector_output(f, batch: int, step: int | None, t: int | None) -> torch.Tensor:
    """The protector must return logits ``[B]`` (``[B, 1]`` is accepted and flattened)."""
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"protector must return a torch.Tensor of logits [B], got {type(f)}")
    if f.dim() == 2 and f.shape[1] == 1:
        f = f[:, 0]
    if tuple(f.shape) != (batch,):
        raise ValueError(
            f"protector must return logits of shape [B] = ({batch},), got {tuple(f.shape)}"
            f"{_where(step, t)}"
        )
    if not f.is_floating_point():
        raise TypeError(f"protector must return floating-point logits, got {f.dtype}")
    return f
