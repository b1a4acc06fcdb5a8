"""A small, configurable UNet ε-model: sinusoidal time embedding, GroupNorm residual blocks.

Built for three jobs: a memorising model of a few dozen 16×16 digits (the demo's worst case), a
"CIFAR-like" 3×32×32 model of a few million parameters, and a ~35M-parameter configuration for
benchmarks. GroupNorm only (no BatchNorm), so samples never mix across the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..layers import timestep_embedding


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`SmallUNet`.

    Attributes:
        in_channels: image channels (1 for digits, 3 for RGB).
        image_size: height = width the model is meant for (recorded; any size divisible by
            ``2 ** (len(channel_mults) - 1)`` works).
        base_channels: channels of the first level.
        channel_mults: channel multiplier per resolution level; each level after the first halves
            the resolution.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: level indices that get a self-attention block after each residual block.
        groups: GroupNorm groups (must divide every level's channel count).
        dropout: dropout inside residual blocks.
    """

    in_channels: int = 1
    image_size: int = 16
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = field(default_factory=tuple)
    groups: int = 8
    dropout: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able dictionary (tuples become lists)."""
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("channel_mults", "attention_levels"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d)


# Named configurations; parameter counts measured with SmallUNet(...).num_parameters().
UNET_CONFIGS: dict[str, UNetConfig] = {
    # 1×16×16 digits: ~0.9M parameters (3.6 MB fp32, 1.8 MB fp16). Memorises 32 digits.
    "digits": UNetConfig(in_channels=1, image_size=16, base_channels=32, channel_mults=(1, 2, 2)),
    # 1×16×16, for fast unit tests: ~30k parameters.
    "tiny": UNetConfig(
        in_channels=1, image_size=16, base_channels=8, channel_mults=(1, 2), groups=4
    ),
    # 3×32×32 "CIFAR-like" model of a few million parameters (~4.4M).
    "cifar-small": UNetConfig(
        in_channels=3,
        image_size=32,
        base_channels=64,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(2,),
        groups=16,
    ),
    # 3×32×32, ~35M parameters: the DDPM-CIFAR-10 class of model, for benchmarks.
    "bench-35m": UNetConfig(
        in_channels=3,
        image_size=32,
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_levels=(1,),
        groups=32,
    ),
}


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, plus a time-embedding shift, twice, with a residual path."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C_in, H, W]``, ``temb``: ``[B, t_dim]`` → ``[B, C_out, H, W]``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions, with a residual path."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, H, W]`` → same shape."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None], v.transpose(1, 2)[:, None]
        )[:, 0]  # [B, HW, C]
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


class SmallUNet(nn.Module):
    """ε-prediction UNet ``(x [B, C, H, W], t int64 [B]) -> ε [B, C, H, W]``.

    Args:
        config: a :class:`UNetConfig`, or the name of one in :data:`UNET_CONFIGS`
            (``"digits"``, ``"tiny"``, ``"cifar-small"``, ``"bench-35m"``).
    """

    def __init__(self, config: UNetConfig | str = "digits"):
        super().__init__()
        if isinstance(config, str):
            if config not in UNET_CONFIGS:
                raise ValueError(f"config must be one of {sorted(UNET_CONFIGS)}, got {config!r}")
            config = UNET_CONFIGS[config]
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig or a name, got {type(config).__name__}")
        self.config = config
        ch = [config.base_channels * m for m in config.channel_mults]
        for c in ch:
            if c % config.groups:
                raise ValueError(f"groups={config.groups} must divide every level width {ch}")
        self.t_dim = 4 * config.base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(config.base_channels, self.t_dim),
            nn.SiLU(),
            nn.Linear(self.t_dim, self.t_dim),
        )
        self.stem = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)

        def block(c_in: int, c_out: int, level: int) -> nn.ModuleList:
            mods = [ResBlock(c_in, c_out, self.t_dim, config.groups, config.dropout)]
            if level in config.attention_levels:
                mods.append(AttnBlock(c_out, config.groups))
            return nn.ModuleList(mods)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch[0]]
        c = ch[0]
        for level, c_out in enumerate(ch):
            for _ in range(config.num_res_blocks):
                self.down.append(block(c, c_out, level))
                c = c_out
                skips.append(c)
            if level < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList(
            [
                ResBlock(c, c, self.t_dim, config.groups, config.dropout),
                AttnBlock(c, config.groups),
                ResBlock(c, c, self.t_dim, config.groups, config.dropout),
            ]
        )
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(ch))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(block(c + skips.pop(), ch[level], level))
                c = ch[level]
            if level > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.out_norm = nn.GroupNorm(config.groups, c)
        self.out_conv = nn.Conv2d(c, config.in_channels, 3, padding=1)
        # Zero-initialised output: the untrained model predicts ε = 0 (the usual DDPM choice).
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict ε. ``x``: ``[B, C, H, W]``; ``t``: int64 ``[B]`` (or a scalar, broadcast)."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must be [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.config.channel_mults) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be divisible by {factor}, got {tuple(x.shape[2:])}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        h = self.stem(x)
        hs = [h]
        n = self.config.num_res_blocks
        for level in range(len(self.config.channel_mults)):
            for i in range(n):
                h = self._run(self.down[level * n + i], h, temb)
                hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        k = 0
        for j, level in enumerate(reversed(range(len(self.config.channel_mults)))):
            for _ in range(n + 1):
                h = self._run(self.up[k], torch.cat([h, hs.pop()], dim=1), temb)
                k += 1
            if level > 0:
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out_conv(F.silu(self.out_norm(h)))

    @staticmethod
    def _run(mods: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = mods[0](h, temb)
        for m in mods[1:]:
            h = m(h)
        return h
