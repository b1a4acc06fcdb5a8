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

Nearest-neighbour search is exact, in torch, in (query chunk × key chunk) blocks so memory stays
at ``chunk_size² `` floats whatever the set sizes; with faiss installed, training sets too large
for that (``faiss_threshold`` keys × dims) go to an exact faiss flat index instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data import check_images

FeatureFn = Callable[[torch.Tensor], torch.Tensor]

# keys × dims above which "auto" prefers faiss (when installed): 2e9 floats = 8 GB of features.
FAISS_THRESHOLD = 2_000_000_000


def as_image_batch(images, name: str) -> torch.Tensor:
    """Validate and convert an image set to a float32 ``[N, C, H, W]`` tensor.

    Accepts a tensor or a numpy array with 4 dims (``[N, C, H, W]``), or 3 dims (``[N, H, W]``,
    one channel). Raises ``ValueError`` naming ``name`` for empty sets, wrong ranks and NaN/inf.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or numpy array, got {type(images).__name__}")
    if images.dim() == 3:
        images = images[:, None]
    if images.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W] (or [N, H, W]), got {tuple(images.shape)}")
    if not images.is_floating_point():
        images = images.float()  # the audit compares any numeric range, uint8 included
    return check_images(images, name, value_range=None)


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{na} and {nb} must have the same image shape, got {tuple(a.shape[1:])} and "
            f"{tuple(b.shape[1:])}"
        )


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` images, σ in pixels, per channel.

    The kernel has radius ``ceil(3σ)`` (at least 1), is normalised to sum 1, and the borders are
    reflect-padded (replicate when an image is smaller than the radius), so a constant image
    stays constant. ``sigma = 0`` returns the images unchanged.
    """
    sigma = float(sigma)
    if not sigma >= 0 or sigma != sigma or sigma == float("inf"):
        raise ValueError(f"blur sigma must be a finite number of pixels >= 0, got {sigma}")
    if sigma == 0:
        return images
    x = images.float()
    radius = max(1, int(np.ceil(3.0 * sigma)))
    offs = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (offs / sigma) ** 2)
    k = (k / k.sum()).float()
    c = x.shape[1]
    pad_mode = "reflect" if min(x.shape[2], x.shape[3]) > radius else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=pad_mode)
    kh = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)  # [C, 1, 1, K]
    kv = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)  # [C, 1, K, 1]
    x = F.conv2d(x, kh, groups=c)
    return F.conv2d(x, kv, groups=c)


def extract_features(
    images: torch.Tensor,  # [N, C, H, W]
    features: str | nn.Module | FeatureFn = "pixels",
    *,
    batch_size: int = 256,
    name: str = "images",
) -> torch.Tensor:
    """Features ``[N, D]`` of an image set.

    Args:
        images: ``[N, C, H, W]`` float images.
        features: ``"pixels"`` (flattened pixel values), or an ``nn.Module`` / callable mapping a
            ``[B, C, H, W]`` batch to ``[B, D]`` features (e.g. SSCD or DINOv2 from local weights).
        batch_size: images per call of the extractor.
        name: the set's name, for error messages.
    """
    if isinstance(features, str):
        if features != "pixels":
            raise ValueError(
                f"features must be 'pixels', an nn.Module or a callable, got {features!r}"
            )
        return images.flatten(1)
    if not callable(features):
        raise TypeError(f"features must be 'pixels', an nn.Module or a callable, got {features!r}")
    out = []
    with torch.no_grad():
        for s in range(0, images.shape[0], batch_size):
            batch = images[s : s + batch_size]
            f = features(batch)
            if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != batch.shape[0]:
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(
                    f"feature extractor must map [B, C, H, W] to [B, D]; for {name} a batch of "
                    f"{batch.shape[0]} gave {got}"
                )
            out.append(f.float().cpu())
    feats = torch.cat(out)
    if not torch.isfinite(feats).all():
        raise ValueError(f"feature extractor returned NaN or inf for {name}")
    return feats


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def nearest_neighbours(
    queries: torch.Tensor,  # [N, D]
    keys: torch.Tensor,  # [M, D]
    k: int = 1,
    *,
    metric: str = "cosine",
    chunk_size: int = 1024,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest keys of every query.

    Args:
        queries: ``[N, D]`` features.
        keys: ``[M, D]`` features.
        k: neighbours per query (clipped to M).
        metric: ``"cosine"`` (largest similarity first) or ``"l2"`` (smallest distance first).
        chunk_size: rows of queries and of keys per block (temporaries of ``chunk_size²`` and
            ``chunk_size × D`` floats; nothing grows with N or M beyond the inputs and outputs).
        backend: ``"torch"``, ``"faiss"`` or ``"auto"`` (faiss when installed and
            ``M × D > FAISS_THRESHOLD``).

    Returns:
        ``(values [N, k], indices [N, k] int64)``: cosine similarities or ℓ2 distances.
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries [N, D] and keys [M, D] must share D, got {tuple(queries.shape)} and "
            f"{tuple(keys.shape)}"
        )
    if keys.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("queries and keys must be non-empty")
    k = max(1, min(int(k), keys.shape[0]))
    if backend == "auto":
        big = keys.shape[0] * keys.shape[1] > FAISS_THRESHOLD
        backend = "faiss" if big and _faiss_available() else "torch"
    if backend == "faiss":
        return _faiss_search(queries, keys, k, metric)
    if backend != "torch":
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    q = queries.float()
    kf = keys.float()
    if metric == "cosine":
        q = F.normalize(q, dim=1)
        kf = F.normalize(kf, dim=1)
    else:
        k_sq = kf.pow(2).sum(1)  # [M]
    vals, idxs = [], []
    for qs in range(0, q.shape[0], chunk_size):
        qc = q[qs : qs + chunk_size]
        best_v = best_i = None
        for ks in range(0, kf.shape[0], chunk_size):
            kc = kf[ks : ks + chunk_size]
            if metric == "cosine":
                score = qc @ kc.T  # [n, m], larger is nearer
            else:
                d2 = qc.pow(2).sum(1, keepdim=True) - 2 * qc @ kc.T + k_sq[ks : ks + chunk_size]
                score = -d2.clamp_min(0)
            v, i = score.topk(min(k, kc.shape[0]), dim=1)
            i = i + ks
            if best_v is not None:
                v, j = torch.cat([best_v, v], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_v, best_i = v, i
        if metric == "l2":
            # Recompute exact distances of the selected pairs (the expansion above loses
            # digits), one neighbour rank at a time: [n, D] temporaries, never [N, k, D].
            best_v = torch.stack(
                [(qc - kf[best_i[:, j]]).norm(dim=1) for j in range(best_i.shape[1])], dim=1
            )
        vals.append(best_v)
        idxs.append(best_i)
    return torch.cat(vals), torch.cat(idxs)


def _faiss_search(q: torch.Tensor, keys: torch.Tensor, k: int, metric: str):
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "backend='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu)"
        ) from None
    qn = q.float().numpy().copy()
    kn = keys.float().numpy().copy()
    if metric == "cosine":
        faiss.normalize_L2(qn)
        faiss.normalize_L2(kn)
        index = faiss.IndexFlatIP(kn.shape[1])
    else:
        index = faiss.IndexFlatL2(kn.shape[1])
    index.add(kn)
    v, i = index.search(qn, k)
    v = torch.from_numpy(v)
    if metric == "l2":
        v = v.clamp_min(0).sqrt()
    return v, torch.from_numpy(i).long()


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
    _check_same_shape(gen, train, "generated", "training")
    thresholds = [check_threshold(t) for t in thresholds]
    if not carlini_n >= 1 or not carlini_alpha > 0:
        raise ValueError(
            f"carlini_n must be >= 1 and carlini_alpha > 0, got {carlini_n}, {carlini_alpha}"
        )
    if blur_sigma is not None:
        gen, train = gaussian_blur(gen, blur_sigma), gaussian_blur(train, blur_sigma)
    fg = extract_features(gen, features, name="generated")
    ft = extract_features(train, features, name="training")
    if fg.shape[1] != ft.shape[1]:
        raise ValueError(f"feature dims differ: generated {fg.shape[1]}, training {ft.shape[1]}")
    used = backend
    if backend == "auto":
        big = ft.shape[0] * ft.shape[1] > FAISS_THRESHOLD
        used = "faiss" if big and _faiss_available() else "torch"
    sim, idx = nearest_neighbours(fg, ft, 1, metric="cosine", chunk_size=chunk_size, backend=used)
    dist, didx = nearest_neighbours(
        fg, ft, carlini_n, metric="l2", chunk_size=chunk_size, backend=used
    )
    ratio = dist[:, 0] / (carlini_alpha * dist.mean(1)).clamp_min(1e-12)
    sim = sim[:, 0].clamp(-1.0, 1.0)
    if feature_name is None:
        feature_name = features if isinstance(features, str) else type(features).__name__
    params = {"n": min(carlini_n, ft.shape[0]), "alpha": carlini_alpha, "delta": carlini_delta}
    if blur_sigma is not None:
        feature_name = f"{feature_name} after Gaussian blur sigma={float(blur_sigma):g} px"
        params["blur_sigma"] = float(blur_sigma)
    return ReplicationResult(
        similarity=sim,
        nearest_index=idx[:, 0],
        rates={t: float((sim > t).float().mean()) for t in thresholds},
        l2_ratio=ratio,
        carlini_nearest_index=didx[:, 0],
        carlini_rate=float((ratio < carlini_delta).float().mean()),
        features=feature_name,
        backend=used,
        params=params,
    )


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


# --------------------------------------------------------------------------- streaming, sharded


class _KeyIndex:
    """Training features, searchable batch after batch: a faiss flat index built once, or the
    exact chunked torch search (see :func:`nearest_neighbours`)."""

    def __init__(self, keys: torch.Tensor, metric: str, backend: str, chunk_size: int):
        self.keys, self.metric, self.backend, self.chunk_size = keys, metric, backend, chunk_size
        self.index = None
        if backend == "faiss":
            try:
                import faiss
            except ImportError:
                raise ImportError(
                    "backend='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu)"
                ) from None
            kn = keys.float().numpy().copy()
            if metric == "cosine":
                faiss.normalize_L2(kn)
                self.index = faiss.IndexFlatIP(kn.shape[1])
            else:
                self.index = faiss.IndexFlatL2(kn.shape[1])
            self.index.add(kn)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = max(1, min(int(k), self.keys.shape[0]))
        if self.index is None:
            return nearest_neighbours(
                queries, self.keys, k, metric=self.metric, chunk_size=self.chunk_size,
                backend="torch",
            )  # fmt: skip
        import faiss

        qn = queries.float().numpy().copy()
        if self.metric == "cosine":
            faiss.normalize_L2(qn)
        v, i = self.index.search(qn, k)
        v = torch.from_numpy(v)
        if self.metric == "l2":
            v = v.clamp_min(0).sqrt()
        return v, torch.from_numpy(i).long()


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
    used = backend
    if backend == "auto":
        big = ft.shape[0] * ft.shape[1] > FAISS_THRESHOLD
        used = "faiss" if big and _faiss_available() else "torch"
    cos_index = _KeyIndex(ft, "cosine", used, chunk_size)
    l2_index = _KeyIndex(ft, "l2", used, chunk_size)
    sims, idxs, ratios, didxs = [], [], [], []
    for batch in batches:
        gen = as_image_batch(batch, "generated")
        _check_same_shape(gen, train, "generated", "training")
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
