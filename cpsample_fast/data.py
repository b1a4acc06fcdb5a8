"""Small image data sets as float32 tensors ``[N, C, H, W]`` in [-1, 1].

Loaders for sklearn's digits, scikit-image's ``lfw_subset`` faces, a folder of images (PIL) and
an ``.npz`` array, plus :func:`check_images`, the one validation every consumer runs. Nothing here
downloads anything: digits and ``lfw_subset`` ship inside the installed packages.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Values may exceed [-1, 1] by float rounding of the loaders' arithmetic; nothing more.
_RANGE_TOL = 1e-5


def check_images(
    images: torch.Tensor,
    name: str = "images",
    *,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
) -> torch.Tensor:
    """The one validation of an image (or latent) batch; returns it as float32.

    The rule: a floating ``[N, C, H, W]`` tensor with ``N >= 1``, every value finite and, unless
    ``value_range`` is None (latents, or models that accept any range), inside ``value_range``
    up to float rounding of the loaders' arithmetic (``1e-5``), then clamped to it.

    Args:
        images: ``[N, C, H, W]`` floating tensor.
        name: The argument's name for error messages.
        value_range: ``(lo, hi)`` the values must lie in (pixels: ``(-1, 1)``), or None.

    Returns:
        ``images`` as a float32 tensor (same device).

    Raises:
        TypeError: not a floating tensor.
        ValueError: wrong rank, empty, NaN/inf, or values outside ``value_range``.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor in [-1, 1], got dtype {images.dtype} "
            "(convert uint8 images with x / 127.5 - 1)"
        )
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W], got {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(images.shape)}): need a non-empty [N, C, H, W] batch"
        )
    if not bool(torch.isfinite(images).all()):
        bad = ~torch.isfinite(images.flatten(1))
        first = bad.any(1).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name} contains NaN or inf ({int(bad.sum())} values; first bad images: {first})"
        )
    if value_range is None:
        return images.float()
    lo_ok, hi_ok = value_range
    lo, hi = float(images.min()), float(images.max())
    if lo < lo_ok - _RANGE_TOL or hi > hi_ok + _RANGE_TOL:
        raise ValueError(
            f"{name} must lie in [{lo_ok:g}, {hi_ok:g}], found values in [{lo:.4g}, {hi:.4g}]; "
            "rescale them (e.g. normalize_images(x), or pass --normalize on the command line)"
        )
    return images.float().clamp(lo_ok, hi_ok)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Map a batch linearly onto [-1, 1] by its global min and max.

    Args:
        images: ``[N, C, H, W]`` tensor, any real dtype.

    Returns:
        float32 ``[N, C, H, W]`` with min -1 and max 1 (all zeros for a constant batch).
    """
    x = torch.as_tensor(images).float()
    if x.numel() == 0:
        raise ValueError("images is empty: nothing to normalize")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contains NaN or infinite values; cannot normalize")
    lo, hi = x.min(), x.max()
    span = (hi - lo).clamp_min(1e-12)
    return ((x - lo) / span * 2.0 - 1.0).clamp(-1.0, 1.0)


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of ``[N, C, H, W]`` to ``size × size``."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    shrink = size < max(x.shape[-2:])
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return y.clamp(-1.0, 1.0)


def _select(x: torch.Tensor, n: int | None, offset: int, source: str) -> torch.Tensor:
    """Rows ``offset … offset + n`` with a clear error when there are not enough."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    total = x.shape[0]
    if n is None:
        n = total - offset
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    if offset + n > total:
        raise ValueError(
            f"{source} has {total} images; cannot take n={n} starting at offset={offset}"
        )
    return x[offset : offset + n]


def load_digits(n: int | None = 64, size: int | None = 16, offset: int = 0) -> torch.Tensor:
    """sklearn's 8×8 handwritten digits (1797 images, shipped with scikit-learn).

    Args:
        n: How many images (``None``: all from ``offset`` on).
        size: Output side length (bilinear resize), ``None`` or 8 to keep 8×8.
        offset: Index of the first image, so that disjoint member / hold-out sets can be drawn.

    Returns:
        float32 ``[n, 1, size, size]`` in [-1, 1].
    """
    from sklearn.datasets import load_digits as _sk_digits

    pixels = torch.from_numpy(_sk_digits().images.astype(np.float32))  # [1797, 8, 8] in 0..16
    x = _select(pixels, n, offset, "digits").unsqueeze(1) / 8.0 - 1.0
    return _resize(x, size).contiguous()


def load_lfw_subset(n: int | None = None, size: int | None = None, offset: int = 0) -> torch.Tensor:
    """scikit-image's ``lfw_subset``: 200 grayscale 25×25 crops (100 faces, then 100 non-faces).

    Args:
        n: How many images (``None``: all from ``offset`` on).
        size: Output side length, ``None`` to keep 25×25.
        offset: Index of the first image.

    Returns:
        float32 ``[n, 1, size, size]`` in [-1, 1].
    """
    from skimage.data import lfw_subset

    pixels = torch.from_numpy(np.asarray(lfw_subset(), dtype=np.float32))  # [200, 25, 25] in 0..1
    x = _select(pixels, n, offset, "lfw_subset").unsqueeze(1) * 2.0 - 1.0
    return _resize(x, size).contiguous()


def _to_nchw_float(arr: np.ndarray, normalize: bool, source: str) -> torch.Tensor:
    """Array ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` → float32 NCHW in [-1, 1]."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        # Channels-last when the last axis is a plausible channel count and the second is not.
        if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            arr = np.transpose(arr, (0, 3, 1, 2))
    else:
        raise ValueError(
            f"{source} must hold images of shape [N, H, W], [N, H, W, C] or [N, C, H, W], "
            f"got {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{source} holds no images (shape {arr.shape})")
    if arr.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(arr)).float() / 127.5 - 1.0
    elif np.issubdtype(arr.dtype, np.number):
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        raise TypeError(f"{source} must hold numbers, got dtype {arr.dtype}")
    if normalize:
        return normalize_images(x)
    return check_images(x, name=source)


def load_npz(
    path: str | os.PathLike,
    key: str | None = None,
    *,
    n: int | None = None,
    size: int | None = None,
    offset: int = 0,
    normalize: bool = False,
) -> torch.Tensor:
    """Images from an ``.npz`` (or ``.npy``) array, loaded without pickle.

    uint8 arrays are mapped by ``x / 127.5 - 1``; float arrays must already lie in [-1, 1]
    unless ``normalize`` is set.

    Args:
        path: The file.
        key: Array name inside the ``.npz`` (default: the only array, or ``"images"``/``"x"``).
        n: How many images (``None``: all from ``offset`` on).
        size: Output side length, ``None`` to keep.
        offset: Index of the first image.
        normalize: Rescale by min/max onto [-1, 1] instead of refusing out-of-range values.

    Returns:
        float32 ``[n, C, size, size]`` in [-1, 1].
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no .npz file at {str(p)!r}")
    with np.load(p, allow_pickle=False) as data:
        if isinstance(data, np.ndarray):
            arr = data
        else:
            names = list(data.keys())
            if key is None:
                key = next((k for k in ("images", "x", "arr_0") if k in names), None)
                if key is None and len(names) == 1:
                    key = names[0]
            if key is None or key not in names:
                raise ValueError(f"{str(p)!r}: choose key= among {names}, got {key!r}")
            arr = data[key]
    x = _to_nchw_float(np.asarray(arr), normalize, f"{p.name}[{key}]")
    return _resize(_select(x, n, offset, str(p)), size).contiguous()


def load_image_folder(
    path: str | os.PathLike,
    *,
    n: int | None = None,
    size: int | None = None,
    offset: int = 0,
    mode: str = "RGB",
) -> torch.Tensor:
    """Every image file in a folder (sorted by name, not recursive), via PIL.

    Args:
        path: The folder.
        n: How many images (``None``: all from ``offset`` on).
        size: Resize each image to ``size × size`` (needed when their sizes differ).
        offset: Index of the first image in name order.
        mode: PIL mode, ``"RGB"`` (3 channels) or ``"L"`` (1 channel).

    Returns:
        float32 ``[n, C, H, W]`` in [-1, 1].
    """
    from PIL import Image

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no image folder at {str(p)!r}")
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {str(p)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    count = len(files) - offset if n is None else n
    idx = _select(torch.arange(len(files)), count, offset, str(p)).tolist()
    arrays = []
    for i in idx:
        with Image.open(files[i]) as im:
            im = im.convert(mode)
            if size is not None:
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(im, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images in {str(p)!r} differ in size {sorted(shapes)}; pass size=")
    return _to_nchw_float(np.stack(arrays), False, str(p))


def as_image_tensor(images, name: str = "images") -> torch.Tensor:
    """Accept a tensor or a ``Dataset`` of image tensors; return a checked float32 batch.

    A dataset item may be a ``[C, H, W]`` tensor or a tuple whose first element is one (the
    ``(image, label)`` convention of torchvision); all items are stacked into memory, which suits
    the small training sets a protector memorises.

    Args:
        images: ``[N, C, H, W]`` tensor or a map-style dataset.
        name: The argument's name for error messages.

    Returns:
        float32 ``[N, C, H, W]`` in [-1, 1].
    """
    if isinstance(images, torch.Tensor):
        return check_images(images, name)
    if isinstance(images, np.ndarray):
        return check_images(torch.from_numpy(images), name)
    if hasattr(images, "__getitem__") and hasattr(images, "__len__"):
        if len(images) == 0:
            raise ValueError(f"{name} is empty: need at least one image")
        items = []
        for i in range(len(images)):
            item = images[i]
            if isinstance(item, (tuple, list)):
                item = item[0]
            item = torch.as_tensor(item)
            if item.dim() != 3:
                raise ValueError(
                    f"{name}[{i}] must be an image [C, H, W], got shape {tuple(item.shape)}"
                )
            items.append(item)
        try:
            stacked = torch.stack(items)
        except RuntimeError as exc:
            raise ValueError(f"{name}: images differ in shape ({exc})") from exc
        return check_images(stacked, name)
    raise TypeError(
        f"{name} must be a tensor [N, C, H, W] or a Dataset of [C, H, W] tensors, "
        f"got {type(images).__name__}"
    )
