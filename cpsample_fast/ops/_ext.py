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


def cuda_archs() -> list[str] | None:
    """The CUDA architectures ``_C``'s kernels were built for (CMake form, e.g. ``["80", "90"]``).

    None when ``_C`` has no CUDA kernels, or when it predates this record (an older build).
    """
    info = build_info()
    if not info or not info.get("cuda"):
        return None
    archs = info.get("cuda_archs")
    if not archs:
        return None
    return [a.strip() for a in str(archs).replace(";", ",").split(",") if a.strip()]


def arch_covers(arch: str, capability: tuple[int, int]) -> bool:
    """Whether one CMake ``CUDA_ARCHITECTURES`` entry runs on a GPU of ``capability``.

    ``"90"`` embeds sm_90 machine code and compute_90 PTX; ``"90-real"`` only the machine code,
    ``"90-virtual"`` only the PTX. Machine code for sm_XY runs on X.Y' with Y' >= Y (same major);
    PTX is compiled by the driver for any newer GPU. An ``a`` suffix (``"90a"``) runs on exactly
    that architecture; ``f`` (family, CUDA 12.9+) on its major with a minor >= its own.
    ``"all"``, ``"all-major"`` and ``"native"`` count as covering.
    """
    arch = arch.strip().lower()
    if arch in ("all", "all-major", "native"):
        return True
    kind = "both"
    for suffix in ("-real", "-virtual"):
        if arch.endswith(suffix):
            kind, arch = suffix[1:], arch[: -len(suffix)]
    variant = arch[-1] if arch and arch[-1] in "af" else ""
    digits = arch[: len(arch) - len(variant)]
    if not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"not a CUDA architecture: {arch!r} (expected '90', '90a', '80-real')")
    want = (int(digits[:-1]), int(digits[-1]))
    have = (int(capability[0]), int(capability[1]))
    if variant == "a":
        return have == want
    same_family = have[0] == want[0] and have[1] >= want[1]
    if variant == "f" or kind == "real":
        return same_family
    return have >= want  # PTX (with or without machine code): JIT-compiled forward


def cuda_archs_cover(capability: tuple[int, int]) -> bool | None:
    """Whether ``_C``'s CUDA kernels run on a GPU of ``capability``; None when unknown."""
    archs = cuda_archs()
    if archs is None:
        return None
    return any(arch_covers(a, capability) for a in archs)


def arch_hint(capability: tuple[int, int]) -> str:
    """What to build for a GPU of ``capability``, as a command line."""
    arch = f"{capability[0]}{capability[1]}"
    return f'CPSAMPLE_BUILD_CUDA=1 CPSAMPLE_CUDA_ARCHS="{arch}" make build'
