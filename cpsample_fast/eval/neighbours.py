"""Nearest-neighbour search over image features (docs/ALGORITHM.md §6, replication): image-set
validation, the Gaussian blur of the copy-robust criterion, feature extraction and the exact
search behind :mod:`cpsample_fast.eval.replication`.

The search is exact, in torch, in (query chunk × key chunk) blocks so memory stays at
``chunk_size²`` floats whatever the set sizes; with faiss installed, training sets too large for
that (``FAISS_THRESHOLD`` keys × dims) go to an exact faiss flat index instead.
"""

from __future__ import annotations

from collections.abc import Callable

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


def check_same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
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


def faiss_available() -> bool:
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
    if search_backend(backend, keys) == "faiss":
        return KeyIndex(keys, metric, "faiss", chunk_size).search(queries, k)
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


def search_backend(backend: str, keys: torch.Tensor) -> str:
    """``"torch"`` or ``"faiss"``: ``"auto"`` is faiss when installed and ``M × D`` of the keys
    exceeds ``FAISS_THRESHOLD``; ``ValueError`` for any other name."""
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    if backend == "auto":
        big = keys.shape[0] * keys.shape[1] > FAISS_THRESHOLD
        return "faiss" if big and faiss_available() else "torch"
    return backend


class KeyIndex:
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
