"""The demo's fixed digits split and the shipped memorising ε-model of its member subset.

sklearn's 8×8 digits, scaled to [0, 1], bilinearly upsampled to 16×16 and mapped to [-1, 1].
One seeded permutation of the 1797 images fixes three disjoint sets: the **members** (the few
dozen digits the memorising model and the protector are trained on), the protector's **hold-out**
non-members (soft target 1/2), and the **evaluation** non-members (Fréchet reference and the
membership attack's negatives). Keeping the evaluation set out of the protector's training is
what makes the membership numbers honest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
DIGITS_UNET = ASSET_DIR / "digits_unet.safetensors"


@dataclass(frozen=True)
class DigitsSplit:
    """Disjoint digit sets (all ``[N, 1, 16, 16]`` float32 in [-1, 1]) and their indices."""

    members: torch.Tensor
    holdout: torch.Tensor
    evaluation: torch.Tensor
    member_index: torch.Tensor
    holdout_index: torch.Tensor
    evaluation_index: torch.Tensor


def digits_16() -> torch.Tensor:
    """All 1797 sklearn digits as ``[1797, 1, 16, 16]`` float32 in [-1, 1] (bilinear 8 → 16).

    ``cpsample_fast.data.load_digits`` (bit-identical to the ``/16 → upsample → 2x-1`` recipe the
    shipped model was trained with; the protector's fingerprint depends on those exact bits).
    """
    from ..data import load_digits

    return load_digits(n=None, size=16)


def digits_split(
    n_members: int = 32, n_holdout: int = 256, n_eval: int = 512, seed: int = 0
) -> DigitsSplit:
    """The fixed member / protector hold-out / evaluation split of the digits (see module doc).

    Args:
        n_members: member images (the memorising model's training set).
        n_holdout: non-members shown to the protector with the soft target 1/2.
        n_eval: non-members kept for evaluation only.
        seed: seed of the permutation.
    """
    x = digits_16()
    if min(n_members, n_holdout, n_eval) < 0 or n_members + n_holdout + n_eval > x.shape[0]:
        raise ValueError(
            f"n_members + n_holdout + n_eval must be non-negative and <= {x.shape[0]}, got "
            f"{n_members} + {n_holdout} + {n_eval}"
        )
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    a, b = n_members, n_members + n_holdout
    mi, hi, ei = perm[:a], perm[a:b], perm[b : b + n_eval]
    return DigitsSplit(x[mi], x[hi], x[ei], mi, hi, ei)


def load_digits_unet(path: str | Path | None = None):
    """Load the shipped memorising digits ε-model.

    Args:
        path: a checkpoint written by ``scripts/train_digits_unet.py`` (default: the asset).

    Returns:
        ``(model, meta)``: a :class:`~cpsample_fast.models.unet.SmallUNet` in eval mode (float32)
        and the JSON sidecar (config, schedule, split, training command and losses).
    """
    from .checkpoint import load_unet

    path = Path(path) if path is not None else DIGITS_UNET
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `python scripts/train_digits_unet.py` to reproduce it"
        )
    return load_unet(path)
