"""Does a protector fit the samples it judges? One rule for every place that pairs a protector
with a model: ``cpsample sample``, the diffusers pipelines, ``ProtectedScheduler`` and the
rejection baseline.

- A protector that declares ``in_channels`` (``ProtectorNet`` does) must take the samples'
  channel count: otherwise ``ValueError``. A latent protector must be trained on the latents the
  UNet sees, a pixel protector on images like the model's.
- A protector that declares ``resolution`` was trained on that size. A convolutional protector
  runs on other sizes, but its confidence there was never trained: ``ValueError`` by default;
  ``resolution="warn"`` (the command line, where a user may mean it) warns instead.
- ``probe=True`` also runs one zero image through it, for protectors that declare nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..validation import check_protector_output


def check_protector_fits(
    protector,
    shape_chw,
    *,
    name: str = "protector",
    resolution: str = "error",
    warn: Callable[[str], None] | None = None,
    probe: bool = False,
    device=None,
) -> None:
    """Check ``protector`` against samples of shape ``(C, H, W)`` (``H``/``W`` may be None when
    unknown: then only the channels are checked).

    Args:
        name: how messages name the protector (e.g. ``"--protector"``).
        resolution: ``"error"`` or ``"warn"`` for a declared resolution other than ``H×W``.
        warn: where a warning goes (default ``warnings.warn``).
        probe: also call it on one zero image at t = 0 on ``device``.

    Raises:
        ValueError: naming ``name``, the declared value and the samples' shape.
    """
    if resolution not in ("error", "warn"):
        raise ValueError(f"resolution must be 'error' or 'warn', got {resolution!r}")
    c, h, w = (None if v is None else int(v) for v in shape_chw)
    pc = getattr(protector, "in_channels", None)
    if isinstance(pc, int) and not isinstance(pc, bool) and pc != c:
        raise ValueError(
            f"{name} has in_channels={pc}, but the samples have {c} channels: train the "
            "protector on images like the samples it judges (a latent protector on the latents "
            "the UNet sees)"
        )
    pr = getattr(protector, "resolution", None)
    if isinstance(pr, int) and h is not None and (h, w) != (pr, pr):
        message = (
            f"{name} has resolution={pr} (trained on {pr}×{pr} images), but the samples are {h}×{w}"
        )
        if resolution == "error":
            raise ValueError(message)
        (warn or warnings.warn)(f"{message}: its confidence on them may mean nothing")
    if probe:
        _probe(protector, (c, h, w), name, device)


def _probe(protector, shape_chw, name, device) -> None:
    x = torch.zeros((1, *shape_chw), device=device)
    t = torch.zeros((1,), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            f = protector(x, t)
        check_protector_output(f, 1, None, None)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(
            f"{name} does not match the model's image shape {tuple(shape_chw)} (C, H, W): "
            f"a probe batch [1, {', '.join(map(str, shape_chw))}] failed with: {err}"
        ) from None
