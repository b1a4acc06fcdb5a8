"""Argument checks and extension dispatch shared by the fused update ops (``guided_update``,
``dpm_update``): metadata only, so no host sync and traceable by dynamo.

Each op's wrapper (eager) or fake (tracing) runs them once; the op body trusts its arguments
(docs/CONTRACTS.md "One home per shared fact"). Every message starts with the op's name.
"""

from __future__ import annotations

import torch

from ..constants import PREDICTION_TYPE_IDS, prediction_type_id
from . import _backends
from ._backends import _BUILD_HINT, BACKENDS


def check_x(op: str, x: torch.Tensor, contiguous: bool = False) -> None:
    """``x``: a float32 tensor ``[B, ...]`` (row-major when ``contiguous``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"{op}: x must be float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a batch dimension [B, ...], got a 0-d tensor")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous (call .contiguous())")


def check_like_x(op: str, t, name: str, x: torch.Tensor, contiguous: bool = False) -> None:
    """``t`` (argument ``name``): float32, on x's device, with x's shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be float32, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} must be on {x.device} like x, got {t.device}")
    if t.shape != x.shape:
        raise ValueError(f"{op}: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (call .contiguous())")


def check_small(
    op: str, t, name: str, dtype: torch.dtype, numel: int, x: torch.Tensor, what: str
) -> None:
    """A small per-step table (``coefs``, ``rng``): ``dtype [numel]``, contiguous, on x's device
    (the kernels read it there without a host sync); ``what`` names its entries."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a {dtype} tensor [{numel}] {what}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype} {what}, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != numel:
        raise ValueError(f"{op}: {name} must have shape [{numel}] {what}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(
            f"{op}: {name} must be on {x.device} like x (kernels read it there without "
            f"a host sync), got {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")


def prediction_id(op: str, prediction_type: int | str) -> int:
    """A prediction type given by name (``"epsilon"``, …) as its id; ids pass through."""
    if not isinstance(prediction_type, str):
        return prediction_type
    try:
        return prediction_type_id(prediction_type)
    except ValueError as err:
        raise ValueError(f"{op}: {err}") from None


def check_options(op: str, prediction_type, clip_sample, backend, **flags) -> None:
    """The ops' static options: ``prediction_type`` an id, ``clip_sample`` and every flag in
    ``flags`` (``draw_noise``, …) a bool, ``backend`` one of ``BACKENDS``."""
    if isinstance(prediction_type, bool) or not isinstance(prediction_type, int):
        raise TypeError(f"{op}: prediction_type must be an int, got {prediction_type!r}")
    if prediction_type not in PREDICTION_TYPE_IDS.values():
        raise ValueError(
            f"{op}: prediction_type must be 0 (epsilon), 1 (v_prediction) or 2 (sample), "
            f"got {prediction_type}"
        )
    for name, value in {"clip_sample": clip_sample, **flags}.items():
        if not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")


def row_major(*tensors):
    """Each tensor made contiguous (a no-op for row-major ones); None stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def ext_function(name: str):
    """The ``cpsample_fast._C`` function ``name``; ``RuntimeError`` with the build hint when the
    extension is not built (or predates that function)."""
    ext = _backends.get_ext()
    if ext is None or not hasattr(ext, name):
        raise RuntimeError(f"cpsample_fast._C is not built (or lacks {name}); {_BUILD_HINT}")
    return getattr(ext, name)


def backend_table(torch_impl, triton_impl, ext_name: str) -> dict:
    """An op's implementation per resolved backend: the torch and Triton functions, and for
    ``"cpp"``/``"cuda"`` the ``_C`` function ``ext_name``, looked up at call time (a missing build
    fails there, with the build hint)."""

    def run_ext(*args):
        return ext_function(ext_name)(*args)

    return {"torch": torch_impl, "triton": triton_impl, "cpp": run_ext, "cuda": run_ext}
