"""Call a user's model in its own dtype and memory format while the sampler stays in float32.

Models may be given in bf16/fp16 and/or channels_last (on a CPU with AVX-512 bf16 that is the
largest single speed lever); x_t and the update stay float32, so only the model call sees the
low precision.
"""

from __future__ import annotations

import torch
from torch import nn


def model_dtype(model) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter, or None for plain callables."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def model_memory_format(model) -> torch.memory_format:
    """``channels_last`` when the model's 4-D weights are stored that way.

    Weights with a size-1 dimension (a 1-channel input conv, a 1×1 conv) are contiguous in both
    formats and say nothing; the first 4-D weight that is unambiguous decides.
    """
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.dim() != 4:
                continue
            cl = p.is_contiguous(memory_format=torch.channels_last)
            if cl != p.is_contiguous():
                return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


class ModelCaller:
    """Feed ``x`` to ``model`` in the model's dtype/layout; return float32 contiguous output.

    Args:
        model: ``model(x, t)``; an ``nn.Module`` or any callable.
        dtype: override the detected input dtype (None = detect from parameters).
        channels_last: override the detected memory format (None = detect).
    """

    def __init__(self, model, *, dtype: torch.dtype | None = None, channels_last=None):
        self.model = model
        self.dtype = dtype if dtype is not None else model_dtype(model)
        if channels_last is None:
            self.memory_format = model_memory_format(model)
        else:
            self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inp = x
        if self.dtype is not None and inp.dtype != self.dtype:
            inp = inp.to(self.dtype)
        if self.memory_format is torch.channels_last and inp.dim() == 4:
            inp = inp.contiguous(memory_format=torch.channels_last)
        return self.model(inp, t)

    @property
    def low_precision(self) -> bool:
        """True when the model runs in a dtype other than float32/float64."""
        return self.dtype in (torch.bfloat16, torch.float16)
