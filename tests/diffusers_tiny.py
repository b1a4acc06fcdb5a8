"""Tiny random diffusers models and a linear protector shared by the diffusers tests."""

from __future__ import annotations

import diffusers
import torch
from torch import nn

C, H = 2, 8


def tiny_unet(seed=0, out_channels=C, **config):
    """A seeded tiny ``UNet2DModel``; ``config`` adds keys (e.g. ``num_class_embeds=3``)."""
    torch.manual_seed(seed)
    return (
        diffusers.UNet2DModel(
            sample_size=H,
            in_channels=C,
            out_channels=out_channels,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            **config,
        )
        .eval()
        .requires_grad_(False)
    )


class LinearProtector(nn.Module):
    """f(x, t) = k·⟨w, x⟩: frozen, per-sample, with a wide spread of |f| over a batch."""

    def __init__(self, k=1.0, seed=1):
        super().__init__()
        w = torch.randn(C * H * H, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("w", w / w.norm())
        self.k = k
        self.eval()

    def forward(self, x, t):
        return self.k * (x.flatten(1) @ self.w)
