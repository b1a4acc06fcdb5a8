"""Random member labels, the training-set fingerprint and the check that ties them together.

A protector is only meaningful together with the labels it memorised and the images they belong
to (docs/ALGORITHM.md §2), so both are stored with every checkpoint and checked before use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# Canonical rounding for the fingerprint: pixel values x ∈ [-1, 1] are mapped to the integer
# grid round((x + 1) · 255 · 2^10). uint8-derived images (x + 1 = 2k/255) and dyadic ones
# (x + 1 = j/2^m, m ≤ 10, e.g. sklearn digits in steps of 1/8) land exactly on grid points, so
# loaders that differ by a few float32 ulps (x/127.5 - 1 vs (x/255)·2 - 1) give the same codes:
# a step is 3.8e-6 and float32 rounding near 1 is 1.2e-7, ~15 ulps from a rounding boundary.
FINGERPRINT_SCALE = 255 * 1024
FINGERPRINT_METHOD = "sha256(int32 LE round((x + 1) * 261120)), NCHW order"


def draw_labels(n: int, seed: int) -> torch.Tensor:
    """I.i.d. ``y_i ~ Bernoulli(1/2)`` from a dedicated CPU generator (docs/ALGORITHM.md §2).

    Args:
        n: Number of training images.
        seed: Label seed (recorded with the protector).

    Returns:
        int64 ``[n]`` of 0/1, identical on every machine for the same ``(n, seed)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64)


def dataset_fingerprint(images: torch.Tensor) -> dict[str, Any]:
    """Count, per-image shape and a hash of the canonically rounded pixels.

    Args:
        images: ``[N, C, H, W]`` in [-1, 1]; the order matters (labels are per index).

    Returns:
        ``{"count", "shape", "sha256", "method"}`` (JSON-able).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a tensor [N, C, H, W]")
    digest = hashlib.sha256()
    # In chunks: float64 codes of a whole CIFAR-10 would take over a gigabyte at once.
    for chunk in images.detach().split(1024):
        codes = torch.round((chunk.to("cpu", torch.float64) + 1.0) * FINGERPRINT_SCALE)
        codes = codes.to(torch.int32).contiguous()
        digest.update(codes.numpy().astype("<i4", copy=False).tobytes())
    return {
        "count": int(images.shape[0]),
        "shape": [int(s) for s in images.shape[1:]],
        "sha256": digest.hexdigest(),
        "method": FINGERPRINT_METHOD,
    }


@dataclass
class VerifyResult:
    """Outcome of :func:`verify_protector`: ``ok`` and, when not, the reasons."""

    ok: bool
    reasons: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


def verify_protector(
    protector_meta: Mapping[str, Any], images: torch.Tensor, *, strict: bool = True
) -> VerifyResult:
    """Check that a protector was trained on exactly these images (same order).

    Args:
        protector_meta: The ``meta`` returned by ``load_protector`` (or any mapping with a
            ``"fingerprint"`` entry, e.g. ``ProtectorReport.to_dict()``).
        images: ``[N, C, H, W]`` in [-1, 1], the data the caller wants protected.
        strict: Raise on a mismatch instead of returning a failed result.

    Returns:
        :class:`VerifyResult` (truthy when the data match).

    Raises:
        ValueError: on a mismatch when ``strict``, or when ``protector_meta`` has no fingerprint.
    """
    if not isinstance(protector_meta, Mapping) or "fingerprint" not in protector_meta:
        raise ValueError("protector_meta must be a mapping with a 'fingerprint' entry")
    stored = protector_meta["fingerprint"]
    actual = dataset_fingerprint(images)
    reasons = []
    if stored.get("count") != actual["count"]:
        reasons.append(f"count: protector has {stored.get('count')}, data has {actual['count']}")
    if list(stored.get("shape", [])) != actual["shape"]:
        reasons.append(f"shape: protector has {stored.get('shape')}, data has {actual['shape']}")
    if stored.get("method") != actual["method"]:
        reasons.append(f"fingerprint method differs: {stored.get('method')!r}")
    elif not reasons and stored.get("sha256") != actual["sha256"]:
        reasons.append("pixel hash differs (different images or a different order)")
    result = VerifyResult(ok=not reasons, reasons=reasons)
    if strict and not result.ok:
        raise ValueError("this protector was trained on a different dataset: " + "; ".join(reasons))
    return result
