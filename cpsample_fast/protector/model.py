"""``ProtectorNet``: the default time-conditioned classifier ``f(x_t, t) -> [B]``
(docs/ALGORITHM.md §2).

A small convolutional encoder: sinusoidal timestep embedding → MLP; residual blocks with
GroupNorm + SiLU and an additive timestep projection; strided-conv downsampling; optional
single-head self-attention at low resolution; GroupNorm → SiLU → global mean pool → linear head.

Every layer acts on one sample at a time (GroupNorm, never BatchNorm), so the Jacobian of the
logits with respect to the batch is block-diagonal and one VJP gives every sample's gradient.
``forward`` has no data-dependent Python control flow, so it runs under ``torch.func.vjp`` and
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import timestep_embedding


def _groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count ≤ ``max_groups`` dividing ``channels`` with ≥ 2 channels per group."""
    for g in (32, 16, 8, 4, 2):
        if g <= max_groups and channels % g == 0 and channels // g >= 2:
            return g
    return 1


class _ResBlock(nn.Module):
    """GN → SiLU → conv → (+ time) → GN → SiLU → dropout → conv, plus a skip connection."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, max_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, max_groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out, max_groups), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W], temb: [B, temb_dim]
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Single-head self-attention over the pixels of one sample (pre-norm, residual)."""

    def __init__(self, channels: int, max_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels, max_groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W]; attention runs within each sample, never across the batch.
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def default_channel_mult(resolution: int) -> tuple[int, ...]:
    """Width multipliers with one downsampling per level down to about 4×4 pixels.

    8 → (1, 2), 16 → (1, 2, 2), 32 → (1, 2, 2, 2), 64 → (1, 2, 2, 2, 4).
    """
    levels = max(1, int(math.log2(max(resolution, 8) / 4)))
    return (1,) + tuple(2 if i < 3 else 4 for i in range(levels))


class ProtectorNet(nn.Module):
    """Time-conditioned convolutional classifier ``f(x_t, t) -> logits [B]`` (docs/ALGORITHM.md §2).

    Args:
        in_channels: Image / latent channels (3 for RGB, 1 for grayscale, 4 for SD latents).
        resolution: Input side length; picks the default depth and where attention goes. Other
            input sizes still run (the head pools globally).
        base_channels: Width of the first level.
        channel_mult: Width multiplier per level; one 2× downsampling between levels. Default
            :func:`default_channel_mult` of ``resolution`` (down to ~4×4).
        num_res_blocks: Residual blocks per level.
        attention_resolutions: Feature-map sizes at which a self-attention layer follows the
            residual blocks (empty: none).
        dropout: Dropout inside residual blocks (0: the protector is meant to overfit).
        max_groups: Upper bound on GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 32,
        base_channels: int = 32,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        max_groups: int = 32,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("resolution", resolution),
            ("base_channels", base_channels),
            ("num_res_blocks", num_res_blocks),
            ("max_groups", max_groups),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        mult = tuple(default_channel_mult(resolution) if channel_mult is None else channel_mult)
        if not mult or any(not isinstance(m, int) or m < 1 for m in mult):
            raise ValueError(f"channel_mult must be positive ints, got {channel_mult!r}")
        attn = tuple(int(r) for r in attention_resolutions)
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "resolution": resolution,
            "base_channels": base_channels,
            "channel_mult": list(mult),
            "num_res_blocks": num_res_blocks,
            "attention_resolutions": list(attn),
            "dropout": float(dropout),
            "max_groups": max_groups,
        }
        self.in_channels = in_channels
        self.resolution = resolution
        self.embed_dim = base_channels
        temb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        blocks: list[nn.Module] = []
        kinds: list[str] = []
        ch, res = base_channels, resolution
        for level, m in enumerate(mult):
            if level > 0:
                blocks.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                kinds.append("down")
                res = (res + 1) // 2
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(ch, base_channels * m, temb_dim, dropout, max_groups))
                kinds.append("res")
                ch = base_channels * m
            if res in attn:
                blocks.append(_Attention(ch, max_groups))
                kinds.append("attn")
        self.blocks = nn.ModuleList(blocks)
        self._kinds = tuple(kinds)
        self.out_norm = nn.GroupNorm(_groups(ch, max_groups), ch)
        self.head = nn.Linear(ch, 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ProtectorNet:
        """Rebuild a network from its :attr:`config` (as stored in a checkpoint sidecar)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        known = {
            "in_channels",
            "resolution",
            "base_channels",
            "channel_mult",
            "num_res_blocks",
            "attention_resolutions",
            "dropout",
            "max_groups",
        }
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown ProtectorNet config keys {sorted(unknown)}")
        return cls(**dict(config))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits of P(y = 1 | x_t).

        Args:
            x: ``[B, C, H, W]`` noised images.
            t: ``[B]`` (or scalar) integer training-schedule timesteps.

        Returns:
            ``[B]`` logits.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.embed_dim).to(x.dtype))  # [B, 4·base]
        h = self.stem(x)
        for kind, block in zip(self._kinds, self.blocks):
            h = block(h, temb) if kind == "res" else block(h)
        h = F.silu(self.out_norm(h)).mean(dim=(2, 3))  # [B, C_last]
        return self.head(h)[:, 0]
