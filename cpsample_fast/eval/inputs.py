"""Checked image-set pairs for the evaluations that compare two sets (docs/ALGORITHM.md §6)."""

from __future__ import annotations

import torch

from .replication import as_image_batch


def image_pair(a, b, name_a: str, name_b: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` as float32 ``[N, C, H, W]`` batches (``as_image_batch``) of one image shape.

    Raises:
        TypeError: either set is not a tensor or array. ValueError: either set is empty, of the
            wrong rank or not finite (naming it), or the two image shapes differ (naming both).
    """
    a, b = as_image_batch(a, name_a), as_image_batch(b, name_b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{name_a} and {name_b} must share the image shape, got {tuple(a.shape[1:])} and "
            f"{tuple(b.shape[1:])}"
        )
    return a, b
