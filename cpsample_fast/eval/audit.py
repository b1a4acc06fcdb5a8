"""The audits the demo and ``cpsample evaluate`` run alike (docs/ALGORITHM.md §6).

Each is one small step over the metrics of this package: replication plain and blurred,
membership through ε and through CPSample's ε̂, the same audit of a rejection-sampling run, and
the nearest-pairs grid of a (possibly sharded) sample set.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path


def replication_audit(samples, train, *, thresholds: Sequence[float], blur_sigma: float = 0.0):
    """``(replication, blurred replication or None)`` of ``samples`` against ``train``.

    Args:
        samples: ``[N, C, H, W]`` images (or a ``cpsample sample`` folder: streamed).
        train: the training images ``[M, C, H, W]``.
        thresholds: cosine-similarity thresholds in [-1, 1].
        blur_sigma: Gaussian blur in pixels on both sets for the second result (0: none).
    """
    from .replication import blurred_replication, replication

    rep = replication(samples, train, thresholds=thresholds)
    if not blur_sigma > 0:
        return rep, None
    return rep, blurred_replication(samples, train, sigma=blur_sigma, thresholds=thresholds)


def membership_attacks(model, members, nonmembers, schedule, *, timesteps, protector=None,
                       **guidance) -> list:  # fmt: skip
    """The membership attack through ε, and through CPSample's ε̂ when ``protector`` is given.

    Args:
        model, members, nonmembers, schedule, timesteps: as for ``membership_inference``.
        protector: the protector of ``members``; ``None`` attacks ε only.
        **guidance: ``scale``, ``alpha``, ``mode`` (and ``guidance_range``) of ε̂.

    Returns:
        ``[MembershipResult(ε)]`` or ``[MembershipResult(ε), MembershipResult(ε̂)]``.
    """
    from .membership import membership_inference

    results = [membership_inference(model, members, nonmembers, schedule, timesteps=timesteps)]
    if protector is not None:
        results.append(
            membership_inference(
                model,
                members,
                nonmembers,
                schedule,
                timesteps=timesteps,
                protector=protector,
                **guidance,
            )  # fmt: skip
        )
    return results


def rejection_audit(rej, train, *, thresholds, blur_sigma=0.0, reference=None, **quality_kw):
    """The report entry of a rejection-sampling run: its result plus replication (plain and
    blurred) and, with ``reference`` and at least two kept samples, quality."""
    from .quality import quality

    rd = rej.to_dict()
    rd["membership_note"] = (
        "rejection leaves the denoiser unchanged: the attack through eps applies"
    )
    if rej.n_accepted:
        rep, blurred = replication_audit(rej.samples, train, thresholds=thresholds,
                                         blur_sigma=blur_sigma)  # fmt: skip
        rd["replication"] = rep.to_dict()
        if blurred is not None:
            rd["replication_blurred"] = blurred.to_dict()
        if reference is not None and rej.n_accepted >= 2:
            rd["quality"] = quality(rej.samples, reference, **quality_kw).to_dict()
    return rd


def save_nearest_pairs(samples, train, result, path: Path, *, shown: int = 16) -> None:
    """The nearest-pairs grid; for a sharded folder only the ``shown`` closest samples are read."""
    from ..sample_audit import is_sharded_run, load_sharded_samples
    from .replication import save_pairs_grid

    if not (isinstance(samples, (str, os.PathLike)) and is_sharded_run(samples)):
        save_pairs_grid(samples, train, result, path)
        return
    top = result.similarity.argsort(descending=True)[:shown]
    best = dataclasses.replace(result, similarity=result.similarity[top],
                               nearest_index=result.nearest_index[top])  # fmt: skip
    save_pairs_grid(load_sharded_samples(samples, top), train, best, path)
