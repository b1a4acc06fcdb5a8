"""``ProtectorComponent``: a ``ProtectorNet`` as a diffusers pipeline component.

As a ``ModelMixin`` it has ``.dtype`` and ``.device``, moves with the pipeline's ``.to()``, takes
part in diffusers' model offloading, and ``pipe.save_pretrained``/``from_pretrained`` store it
as safetensors (``protector/diffusion_pytorch_model.safetensors`` + ``config.json``) together
with the labels' seed-free record it was trained for: the member labels and the training set's
fingerprint (docs/ALGORITHM.md §2: a protector is only meaningful with the set it protects).

This module imports diffusers; ``cpsample_fast.diffusers`` imports it lazily.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..protector.model import ProtectorNet


class ProtectorComponent(ModelMixin, ConfigMixin):
    """``f(x_t, t) -> logits [B]`` of a ``ProtectorNet``, loadable by diffusers.

    Args:
        protector_config: the ``ProtectorNet`` config (``net.config``).
        labels: the member labels it memorised (from the protector's checkpoint), optional.
        fingerprint: the training set's fingerprint, optional.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, protector_config: dict, labels=None, fingerprint=None):
        super().__init__()
        self.net = ProtectorNet.from_config(protector_config)

    @classmethod
    def from_protector(cls, net: ProtectorNet, meta: dict | None = None) -> ProtectorComponent:
        """Wrap a trained ``ProtectorNet`` (weights copied; frozen, eval mode)."""
        if not isinstance(net, ProtectorNet):
            raise TypeError(f"net must be a ProtectorNet, got {type(net).__name__}")
        meta = meta or {}
        comp = cls(dict(net.config), meta.get("labels"), meta.get("fingerprint"))
        comp.net.load_state_dict(net.state_dict())
        p = next(net.parameters())
        return comp.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def resolution(self) -> int:
        return self.net.resolution

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # [B,C,H,W], [B] -> [B]
        return self.net(x, t)


class ModuleProtector(torch.nn.Module):
    """Any ``nn.Module`` protector with the ``.dtype``/``.device`` a pipeline component needs.

    Used for custom protector architectures (not saveable by ``save_pretrained``: diffusers
    warns and skips it; save them with ``save_protector``).
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.training = net.training  # mirror the net: eval() stays eval()

    def _first(self):
        for p in self.net.parameters():
            return p
        for b in self.net.buffers():
            return b
        return None

    @property
    def device(self) -> torch.device:
        p = self._first()
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = self._first()
        return p.dtype if p is not None else torch.float32

    @property
    def in_channels(self):
        return getattr(self.net, "in_channels", None)

    @property
    def resolution(self):
        return getattr(self.net, "resolution", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)
