"""Building blocks shared by the package's networks (the protector and the small UNet)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, as diffusers' ``get_timestep_embedding``.

    Args:
        t: ``[B]`` timesteps (any numeric dtype).
        dim: Embedding width (a zero column pads an odd width).
        max_period: Longest wavelength.

    Returns:
        float32 ``[B, dim]``: ``[cos(t·ω_k), sin(t·ω_k)]``.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)  # [half]
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))  # a zero column when dim is odd
