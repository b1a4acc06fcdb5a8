"""The exact optimal denoiser of a finite training set: a model that only reproduces its data.

For training images ``x_1..x_N`` and ``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε``, the posterior over which
image was noised is ``p(i | x_t) = softmax_i(-‖x_t - √ᾱ_t x_i‖² / (2(1-ᾱ_t)))``, so the
minimiser of the DDPM loss is ``ε*(x_t, t) = (x_t - √ᾱ_t E[x0 | x_t]) / √(1-ᾱ_t)``. Deterministic
DDIM with ``ε*`` lands on a training image from almost every starting noise: the worst case a
defence such as CPSample must face, with no training needed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import check_images


class EmpiricalDenoiser(nn.Module):
    """``ε*(x_t, t)`` of a finite training set (see module doc).

    Args:
        images: training images ``[N, C, H, W]`` (finite, N ≥ 1).
        schedule: a ``NoiseSchedule`` (anything with ``alphas_cumprod [T]``) or that tensor.
        chunk_size: training images scored at once (bounds memory at ``B × chunk`` floats).

    The posterior logits are computed in float64: at small t, ``2(1-ᾱ_t) ≈ 2e-4`` and float32's
    ``‖x‖² - 2x·y + ‖y‖²`` would carry logit errors of ~0.1 on 16×16 images.
    """

    def __init__(self, images: torch.Tensor, schedule, chunk_size: int = 4096):
        super().__init__()
        check_images(images, "images", value_range=None)
        ac = getattr(schedule, "alphas_cumprod", schedule)
        if not isinstance(ac, torch.Tensor) or ac.dim() != 1:
            raise TypeError("schedule must have alphas_cumprod (a tensor [T]) or be that tensor")
        self.register_buffer("images", images.detach().double().flatten(1))  # [N, D]
        self.register_buffer("sq_norms", self.images.pow(2).sum(1))  # [N]
        self.register_buffer("alphas_cumprod", ac.detach().double())
        self.image_shape = tuple(images.shape[1:])
        self.chunk_size = int(chunk_size)

    def posterior_mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x_t]`` ``[B, C, H, W]`` for ``x``: ``[B, C, H, W]``, ``t``: int64 ``[B]``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must be [B, {self.image_shape}], got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).long().expand(x.shape[0])
        a = self.alphas_cumprod[t]  # [B]
        xf = x.double().flatten(1)  # [B, D]
        # log-sum-exp over training chunks, streaming (max, sum, weighted sum).
        scale = a.sqrt() / (1 - a)  # [B]: logit_i = scale · x·x_i - a‖x_i‖²/(2(1-a)) + const
        m = torch.full((x.shape[0],), -torch.inf, dtype=torch.float64, device=x.device)
        z = torch.zeros_like(m)
        acc = torch.zeros_like(xf)
        for s in range(0, self.images.shape[0], self.chunk_size):
            im = self.images[s : s + self.chunk_size]  # [n, D]
            logits = (
                scale[:, None] * (xf @ im.T)
                - (a / (2 * (1 - a)))[:, None] * self.sq_norms[s : s + self.chunk_size][None]
            )  # [B, n]
            m_new = torch.maximum(m, logits.max(1).values)
            w = torch.exp(logits - m_new[:, None])  # [B, n]
            corr = torch.exp(m - m_new)
            z = z * corr + w.sum(1)
            acc = acc * corr[:, None] + w @ im
            m = m_new
        return (acc / z[:, None]).reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``ε*(x_t, t)`` ``[B, C, H, W]``; ``x``: ``[B, C, H, W]``, ``t``: int64 ``[B]``."""
        t = torch.as_tensor(t, device=x.device).long().expand(x.shape[0])
        a = self.alphas_cumprod[t].to(x.dtype)[:, None, None, None]
        x0 = self.posterior_mean(x, t)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
