"""Benchmark configurations: which eps-model and protector, at which batch, steps and device.

The models are the package's own (``SmallUNet`` named configs, ``ProtectorNet``) with seeded
random weights. ``SmallUNet`` zero-initialises its output convolution (an untrained model
predicts ε = 0); that layer is re-initialised here so that the eps-model's output, and hence the
low-precision error the accuracy column reports, is not trivially zero.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..models import SmallUNet
from ..protector import ProtectorNet
from ..schedule import NoiseSchedule


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration.

    Attributes:
        name: ``tiny``, ``cifar`` or ``gpu35m``.
        unet: a ``SmallUNet`` config name (``UNET_CONFIGS``).
        channels: image channels.
        size: image height = width.
        batch: default batch size.
        steps: default number of DDIM steps.
        device: the device the configuration is meant for (``cpu`` or ``cuda``).
        about: one line for the table's title.
        protector: ``ProtectorNet`` keyword arguments beyond the image's (``in_channels``,
            ``resolution``, which follow ``channels`` and ``size``).
    """

    name: str
    unet: str
    channels: int
    size: int
    batch: int
    steps: int
    device: str
    about: str
    protector: dict = field(default_factory=dict)

    def shape(self, batch: int | None = None) -> tuple[int, int, int, int]:
        """``(B, C, H, W)`` of one sampling call."""
        return (int(batch or self.batch), self.channels, self.size, self.size)

    def protector_kwargs(self) -> dict:
        """Every ``ProtectorNet`` keyword argument of this configuration."""
        return {"in_channels": self.channels, "resolution": self.size, **self.protector}

    def to_dict(self) -> dict:
        """JSON-able description (``protector``: every ``ProtectorNet`` keyword argument)."""
        return {**asdict(self), "protector": self.protector_kwargs()}


# A table, one configuration per entry: the model, the image and run sizes, the title.
# fmt: off
CONFIGS: dict[str, BenchConfig] = {
    # For tests and CI: a ~30k-parameter UNet on 1×16×16, an odd batch, a few steps.
    "tiny": BenchConfig(
        "tiny", unet="tiny", protector={"base_channels": 8, "max_groups": 4},
        channels=1, size=16, batch=3, steps=3, device="cpu",
        about="tiny UNet (1x16x16) + tiny ProtectorNet",
    ),
    # The CPU target of the fast-path issue: CIFAR-like UNet (~4.4M parameters) + its
    # ProtectorNet (~0.36M) at batch 16.
    "cifar": BenchConfig(
        "cifar", unet="cifar-small",
        channels=3, size=32, batch=16, steps=10, device="cpu",
        about="CIFAR-like UNet 'cifar-small' (3x32x32) + ProtectorNet",
    ),
    # The GPU target: the ~35M-parameter UNet at batch 64 with a wider protector.
    "gpu35m": BenchConfig(
        "gpu35m", unet="bench-35m", protector={"base_channels": 64},
        channels=3, size=32, batch=64, steps=20, device="cuda",
        about="35M-parameter UNet 'bench-35m' (3x32x32) + ProtectorNet(base 64)",
    ),
}
# fmt: on


def get_config(name: str) -> BenchConfig:
    """The named configuration; a ``ValueError`` lists the known names."""
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[name]


def build_models(config: BenchConfig, device: torch.device | str, seed: int = 0):
    """Seeded float32 ``(eps_model, protector)`` in eval mode on ``device``.

    Returns:
        ``(SmallUNet, ProtectorNet)`` with every parameter random (no zero output layer).
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        eps_model = SmallUNet(config.unet)
        # Default Conv2d init instead of SmallUNet's zero output layer (see the module doc).
        eps_model.out_conv.reset_parameters()
        protector = ProtectorNet(**config.protector_kwargs())
    finally:
        torch.random.set_rng_state(gen_state)
    return eps_model.to(device).eval(), protector.to(device).eval()


def convert_model(model: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> nn.Module:
    """A copy of ``model`` in ``dtype`` (and channels_last), leaving the original untouched."""
    other = copy.deepcopy(model)
    if channels_last:
        return other.to(dtype=dtype, memory_format=torch.channels_last)
    return other.to(dtype=dtype)


def default_schedule() -> NoiseSchedule:
    """The DDPM linear schedule with diffusers' DDIM defaults (clip_sample on, T = 1000)."""
    return NoiseSchedule()
