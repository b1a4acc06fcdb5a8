"""Loader of the compiled extension ``cpsample_fast._C`` (C++ CPU and CUDA kernels, ``csrc/``).

The extension is optional: without it every op falls back to torch (or Triton). A missing or
stale build warns once and never breaks ``import cpsample_fast``.
"""

from __future__ import annotations

import importlib
import threading
import types
import warnings

_MISSING_MESSAGE = "cpsample_fast._C not built; using torch fallbacks — run `make build`"

_lock = threading.Lock()
_loaded = False
_module: types.ModuleType | None = None
_error: str | None = None


def _load() -> types.ModuleType | None:
    global _loaded, _module, _error
    with _lock:
        if _loaded:
            return _module
        _loaded = True
        try:
            # torch first: _C links libtorch and uses torch's pybind11 Tensor casters.
            import torch  # noqa: F401

            _module = importlib.import_module("cpsample_fast._C")
        except ImportError as exc:
            _module = None
            _error = str(exc)
            detail = "" if isinstance(exc, ModuleNotFoundError) else f" (import failed: {exc})"
            warnings.warn(_MISSING_MESSAGE + detail, RuntimeWarning, stacklevel=3)
        return _module


def get_ext() -> types.ModuleType | None:
    """Returns the compiled module ``cpsample_fast._C``, or None when it is not built.

    The first call that finds no usable module warns once (``RuntimeWarning``):
    "cpsample_fast._C not built; using torch fallbacks — run `make build`". A module built
    against another torch (an undefined-symbol ``ImportError``) counts as not built, and the
    warning carries the import error.

    Returns:
        The module, with ``guided_update``, ``philox_normal`` and ``build_info``; or None.
    """
    if _loaded:
        return _module
    return _load()


def load_error() -> str | None:
    """The import error of ``cpsample_fast._C`` when it could not be loaded, else None."""
    get_ext()
    return _error


def build_info() -> dict | None:
    """``_C.build_info()`` (cuda, openmp, compiler, ...) or None when ``_C`` is not built."""
    ext = get_ext()
    return None if ext is None else dict(ext.build_info())


def has_cuda_kernels() -> bool:
    """Whether ``_C`` is built and includes its CUDA kernels."""
    info = build_info()
    return bool(info and info.get("cuda", False))
