"""Replication: how close each generated image comes to its nearest training image
(docs/ALGORITHM.md §6).

Two criteria, both on features (pixels by default, or any user feature extractor such as SSCD or
DINOv2 loaded from local weights):

- cosine similarity to the nearest training image, its distribution, and the fraction above a
  threshold (CPSample paper: 0.97 CIFAR-10, 0.95 CelebA, 0.90 LSUN Church);
- Carlini et al. (2023, "Extracting training data from diffusion models", §5): ℓ2 distance to the
  nearest training image over ``α`` times the mean ℓ2 distance to the ``n`` nearest (α = 0.5,
  n = 50 there); a generation counts as extracted below ``δ`` (1/3 here).

A third, copy-robust criterion (``blur_sigma``): both sides — generated and training images,
and any calibration set passed the same way — are smoothed by the same Gaussian blur of standard
deviation ``blur_sigma`` **pixels** before the features are taken (:func:`gaussian_blur`). A
member with speckle noise on it (what an over-strong guidance can leave) stays a near copy after
the blur, while genuinely new images do not become copies; σ = 1 px is the default of the demo
and of ``cpsample evaluate --blur-sigma``.

The features and the exact nearest-neighbour search live in :mod:`cpsample_fast.eval.neighbours`;
this module turns them into the criteria and their report.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .neighbours import (  # noqa: F401  (re-exported: the names' old home)
    FAISS_THRESHOLD,
    FeatureFn,
    KeyIndex,
    as_image_batch,
    check_same_shape,
    extract_features,
    faiss_available,
    gaussian_blur,
    nearest_neighbours,
    search_backend,
)

_faiss_available = faiss_available


@dataclass
class ReplicationResult:
    """Nearest-training-neighbour statistics of a generated set.

    Attributes:
        similarity: cosine similarity of each generated image to its nearest training image
            ``[N]``.
        nearest_index: index of that training image ``[N]``.
        rates: threshold → fraction of generated images with similarity above it.
        l2_ratio: Carlini et al.'s ratio ``d_1 / (α · mean(d_1..d_n))`` ``[N]``.
        carlini_nearest_index: nearest training image in ℓ2 ``[N]``.
        carlini_rate: fraction with ``l2_ratio < carlini_delta``.
        features: name of the feature space.
        backend: nearest-neighbour backend used.
        params: the criterion's parameters (``n``, ``α``, ``δ``).
    """

    similarity: torch.Tensor
    nearest_index: torch.Tensor
    rates: dict[float, float]
    l2_ratio: torch.Tensor
    carlini_nearest_index: torch.Tensor
    carlini_rate: float
    features: str
    backend: str
    params: dict = field(default_factory=dict)

    def rate(self, threshold: float) -> float:
        """Fraction of generated images with nearest-neighbour similarity above ``threshold``."""
        check_threshold(threshold)
        return float((self.similarity > threshold).float().mean())

    def to_dict(self, bins: int = 20) -> dict:
        """JSON-able summary: rates, mean/max/quantiles, a histogram, Carlini's rate."""
        s = self.similarity.double()
        hist, edges = np.histogram(s.numpy(), bins=bins, range=(-1.0, 1.0))
        return {
            "features": self.features,
            "backend": self.backend,
            "n_generated": int(s.numel()),
            "replication_rate": {f"{t:g}": r for t, r in self.rates.items()},
            "similarity_mean": float(s.mean()),
            "similarity_max": float(s.max()),
            "similarity_quantiles": {
                f"{q:g}": float(s.quantile(q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)
            },
            "similarity_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
            "carlini": dict(
                self.params, rate=self.carlini_rate, ratio_median=float(self.l2_ratio.median())
            ),
        }


def check_threshold(t: float) -> float:
    """A cosine-similarity threshold must lie in [-1, 1]."""
    t = float(t)
    if not (-1.0 <= t <= 1.0) or t != t:
        raise ValueError(f"similarity thresholds must lie in [-1, 1], got {t}")
    return t


def replication(
    generated,  # [N, C, H, W]
    training,  # [M, C, H, W]
    *,
    features: str | nn.Module | FeatureFn = "pixels",
    thresholds: Sequence[float] = (0.95,),
    carlini_n: int = 50,
    carlini_alpha: float = 0.5,
    carlini_delta: float = 1.0 / 3.0,
    chunk_size: int = 1024,
    backend: str = "auto",
    feature_name: str | None = None,
    blur_sigma: float | None = None,
) -> ReplicationResult:
    """Nearest-training-neighbour similarity of generated images (docs/ALGORITHM.md §6,
    replication).

    Args:
        generated: generated images ``[N, C, H, W]`` (tensor or numpy).
        training: training images ``[M, C, H, W]``, same image shape.
        features: ``"pixels"`` or a feature extractor ``[B, C, H, W] -> [B, D]``.
        thresholds: cosine-similarity thresholds in [-1, 1] for the replication rate.
        carlini_n: neighbours averaged in Carlini et al.'s denominator.
        carlini_alpha: the α in that denominator.
        carlini_delta: a generation is "extracted" when the ratio is below δ.
        chunk_size: block size of the exact search.
        backend: ``"auto"``, ``"torch"`` or ``"faiss"`` (see :func:`nearest_neighbours`).
        feature_name: name recorded for the feature space (default: ``"pixels"`` or the
            extractor's class name).
        blur_sigma: when given, a Gaussian blur of this standard deviation **in pixels** is
            applied to the generated *and* the training images before the features (the
            "near copy under light denoising" audit, see the module doc); recorded in
            ``params["blur_sigma"]`` and in the feature name.

    ``generated`` may also be the output folder of a ``cpsample sample`` run (its verified
    shards are read one at a time: :func:`replication_sharded`; no ``blur_sigma`` there).
    """
    if isinstance(generated, (str, os.PathLike)):
        if blur_sigma is not None:
            raise ValueError(
                "blur_sigma is not supported on a sharded run folder; pass the samples "
                "(e.g. samples.npz) instead"
            )
        return replication_sharded(
            generated, training, features=features, thresholds=thresholds, carlini_n=carlini_n,
            carlini_alpha=carlini_alpha, carlini_delta=carlini_delta, chunk_size=chunk_size,
            backend=backend, feature_name=feature_name,
        )  # fmt: skip
    gen = as_image_batch(generated, "generated")
    train = as_image_batch(training, "training")
    check_same_shape(gen, train, "generated", "training")
    if blur_sigma is not None:
        gen, train = gaussian_blur(gen, blur_sigma), gaussian_blur(train, blur_sigma)
    result = replication_stream(
        [gen], train, features=features, thresholds=thresholds, carlini_n=carlini_n,
        carlini_alpha=carlini_alpha, carlini_delta=carlini_delta, chunk_size=chunk_size,
        backend=backend, feature_name=feature_name,
    )  # fmt: skip
    if blur_sigma is not None:
        result.features = f"{result.features} after Gaussian blur sigma={float(blur_sigma):g} px"
        result.params["blur_sigma"] = float(blur_sigma)
    return result


def blurred_replication(
    generated,  # [N, C, H, W]
    training,  # [M, C, H, W]
    *,
    sigma: float = 1.0,
    thresholds: Sequence[float] = (0.98,),
    **kwargs,
) -> ReplicationResult:
    """Near copies under light denoising: :func:`replication` in pixels after a Gaussian blur.

    Both sets are blurred by the same Gaussian of standard deviation ``sigma`` pixels
    (:func:`gaussian_blur`) and compared by pixel cosine similarity; a member with speckle noise
    on it counts as the copy it is. Calibrate the threshold with real held-out images passed as
    ``generated`` (the demo reports that column). Other keyword arguments go to
    :func:`replication`.
    """
    return replication(generated, training, thresholds=thresholds, blur_sigma=sigma, **kwargs)


def save_pairs_grid(
    generated,  # [N, C, H, W]
    training,  # [M, C, H, W]
    result: ReplicationResult,
    path,
    *,
    n: int = 16,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> None:
    """PNG of the ``n`` most similar (generated, nearest training) pairs, best first.

    Each column shows a generated image above its nearest training image, titled with the
    cosine similarity.
    """
    from .plots import save_pairs_png

    gen = as_image_batch(generated, "generated")
    train = as_image_batch(training, "training")
    order = result.similarity.argsort(descending=True)[:n]
    save_pairs_png(
        gen[order],
        train[result.nearest_index[order]],
        [f"{float(result.similarity[i]):.3f}" for i in order],
        path,
        value_range=value_range,
        top_label="generated",
        bottom_label="nearest train",
    )


def replication_stream(
    batches,
    training,  # [M, C, H, W]
    *,
    features: str | nn.Module | FeatureFn = "pixels",
    thresholds: Sequence[float] = (0.95,),
    carlini_n: int = 50,
    carlini_alpha: float = 0.5,
    carlini_delta: float = 1.0 / 3.0,
    chunk_size: int = 1024,
    backend: str = "auto",
    feature_name: str | None = None,
) -> ReplicationResult:
    """:func:`replication` over generated images that arrive in batches (e.g. shards).

    Holds the training features, one batch of generated images and the per-sample results
    (a few numbers per sample), never all generated images. Same results as
    :func:`replication` on the concatenated batches.

    Args:
        batches: iterable of ``[n, C, H, W]`` tensors or arrays.
        others: as for :func:`replication`; with ``backend="faiss"`` the two flat indexes are
            built once and searched batch after batch.
    """
    train = as_image_batch(training, "training")
    thresholds = [check_threshold(t) for t in thresholds]
    if not carlini_n >= 1 or not carlini_alpha > 0:
        raise ValueError(
            f"carlini_n must be >= 1 and carlini_alpha > 0, got {carlini_n}, {carlini_alpha}"
        )
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    ft = extract_features(train, features, name="training")
    used = search_backend(backend, ft)
    cos_index = KeyIndex(ft, "cosine", used, chunk_size)
    l2_index = KeyIndex(ft, "l2", used, chunk_size)
    sims, idxs, ratios, didxs = [], [], [], []
    for batch in batches:
        gen = as_image_batch(batch, "generated")
        check_same_shape(gen, train, "generated", "training")
        fg = extract_features(gen, features, name="generated")
        if fg.shape[1] != ft.shape[1]:
            raise ValueError(
                f"feature dims differ: generated {fg.shape[1]}, training {ft.shape[1]}"
            )
        sim, idx = cos_index.search(fg, 1)
        dist, didx = l2_index.search(fg, carlini_n)
        ratios.append(dist[:, 0] / (carlini_alpha * dist.mean(1)).clamp_min(1e-12))
        sims.append(sim[:, 0].clamp(-1.0, 1.0))
        idxs.append(idx[:, 0])
        didxs.append(didx[:, 0])
    if not sims:
        raise ValueError("generated is empty (no batches)")
    sim, ratio = torch.cat(sims), torch.cat(ratios)
    if feature_name is None:
        feature_name = features if isinstance(features, str) else type(features).__name__
    return ReplicationResult(
        similarity=sim,
        nearest_index=torch.cat(idxs),
        rates={t: float((sim > t).float().mean()) for t in thresholds},
        l2_ratio=ratio,
        carlini_nearest_index=torch.cat(didxs),
        carlini_rate=float((ratio < carlini_delta).float().mean()),
        features=feature_name,
        backend=used,
        params={"n": min(carlini_n, ft.shape[0]), "alpha": carlini_alpha, "delta": carlini_delta},
    )


def replication_sharded(run_dir, training, **kwargs) -> ReplicationResult:
    """:func:`replication_stream` over the shards of a finished ``cpsample sample`` run.

    Every shard is verified (run identity and checksum, as listed in the run's manifest)
    before it is used; one shard is in memory at a time. ``kwargs`` as for
    :func:`replication` (``backend="faiss"`` for large training sets).
    """
    from ..shards import iter_shards, open_sharded_output

    manifest = open_sharded_output(run_dir)
    batches = (t["samples"] for _, t, _ in iter_shards(run_dir, manifest))
    return replication_stream(batches, training, **kwargs)
