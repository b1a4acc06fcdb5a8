"""``cpsample::dpm_update``: one DPM-Solver++(2M) step ``(x_t, x̂0_prev) → (x_{t'}, x̂0)`` as one op.

The multistep counterpart of ``cpsample::guided_update`` (docs/CONTRACTS.md "The multistep
update"). The solver's state is the previous step's data prediction, carried as a tensor the op
reads and writes, so a compiled step is one graph for all steps and a CUDA-graph replay needs no
host: the per-step scalars come from a ``coefs`` row on the device (``cpsample_fast.solvers``).
Backends as ``guided_update``: "torch" (``_torch.dpm_update``, the specification), "triton",
"cpp" and "cuda" (``cpsample_fast._C``), "auto".
"""

from __future__ import annotations

import torch

from ..solvers import NUM_DPM_COEFS
from . import _torch
from . import _triton as _triton_impl
from ._backends import resolve_backend
from ._checks import (
    backend_table,
    check_like_x,
    check_options,
    check_small,
    check_x,
    prediction_id,
    row_major,
)


def check_dpm_update_args(
    x, model_out, guidance, x0_prev, coefs, prediction_type, clip_sample, backend
) -> None:
    """Validate the op's arguments; raise ``TypeError``/``ValueError`` naming the bad one."""
    op = "dpm_update"
    check_x(op, x)
    check_like_x(op, model_out, "model_out", x)
    if guidance is not None:
        check_like_x(op, guidance, "guidance", x)
    check_like_x(op, x0_prev, "x0_prev", x)
    check_small(op, coefs, "coefs", torch.float32, NUM_DPM_COEFS, x,
                "(alpha_s, sigma_s, A, B, C, R, clip_range)")  # fmt: skip
    check_options(op, prediction_type, clip_sample, backend)


_IMPLS = backend_table(_torch.dpm_update, _triton_impl.dpm_update, "dpm_update")


@torch.library.custom_op(
    "cpsample::dpm_update",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor model_out, Tensor? guidance, Tensor x0_prev, Tensor coefs, "
        "int prediction_type, bool clip_sample, str backend) -> (Tensor, Tensor)"
    ),
)
def _dpm_update_op(x, model_out, guidance, x0_prev, coefs, prediction_type, clip_sample, backend):
    # Checked once by the wrapper (eager) or the fake (tracing); the body trusts its arguments.
    x, model_out, guidance, x0_prev = row_major(x, model_out, guidance, x0_prev)
    impl = _IMPLS[resolve_backend(backend, x.device)]
    return impl(x, model_out, guidance, x0_prev, coefs, prediction_type, clip_sample)


@_dpm_update_op.register_fake
def _dpm_update_fake(x, model_out, guidance, x0_prev, coefs, prediction_type, clip_sample, backend):
    check_dpm_update_args(
        x, model_out, guidance, x0_prev, coefs, prediction_type, clip_sample, backend
    )
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    x, model_out, guidance, x0_prev, coefs, prediction_type, clip_sample, _ = inputs
    ctx.save_for_backward(x, model_out, guidance, x0_prev, coefs)
    ctx.prediction_type = prediction_type
    ctx.clip_sample = clip_sample
    ctx.has_guidance = guidance is not None


def _backward(ctx, grad_out, grad_x0):
    """Every backend computes ``_torch.dpm_update``'s function: differentiate that."""
    x, model_out, guidance, x0_prev, coefs = ctx.saved_tensors
    leaves = [x, model_out, x0_prev] + ([guidance] if ctx.has_guidance else [])
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    with torch.enable_grad():
        g = leaves[3] if ctx.has_guidance else None
        out, x0 = _torch.dpm_update(
            leaves[0], leaves[1], g, leaves[2], coefs, ctx.prediction_type, ctx.clip_sample
        )
        outs, grads = [], []
        for o, go in ((out, grad_out), (x0, grad_x0)):
            if go is not None:
                outs.append(o)
                grads.append(go)
        got = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    got = [torch.zeros_like(t) if gt is None else gt for t, gt in zip(leaves, got)]
    gg = got[3] if ctx.has_guidance else None
    return got[0], got[1], gg, got[2], None, None, None, None


_dpm_update_op.register_autograd(_backward, setup_context=_setup_context)


def dpm_update(
    x: torch.Tensor,  # [B, ...] float32, x_t
    model_out: torch.Tensor,  # [B, ...] float32, raw eps-model output
    guidance: torch.Tensor | None,  # [B, ...] float32 guidance term G (already scaled) or None
    x0_prev: torch.Tensor,  # [B, ...] float32, the previous step's x0 (zeros on step 0)
    coefs: torch.Tensor,  # [7] float32 on x's device: (alpha_s, sigma_s, A, B, C, R, clip)
    *,
    prediction_type: int | str,
    clip_sample: bool,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DPM-Solver++(2M) step (docs/CONTRACTS.md "The multistep update").

    ``x0`` from ``model_out`` by ``prediction_type``, guided ``x0 - (σ_s/α_s)·G`` and clipped to
    ``±clip`` when ``clip_sample``; ``x_{t'} = (A·x - B·x0) - C·(R·(x0 - x0_prev))``. A row of
    ``cpsample_fast.solvers.dpm_coef_table`` is ``coefs``; first-order rows have ``C = R = 0``.

    Args:
        x, model_out, guidance, x0_prev: ``[B, ...]`` float32 on one device, any strides.
        coefs: float32 ``[7]`` on ``x.device``.
        prediction_type: 0/"epsilon", 1/"v_prediction" or 2/"sample".
        clip_sample: clamp x0 to ``±clip``.
        backend: "auto", "torch", "triton", "cpp" or "cuda".

    Returns:
        ``(x_{t'}, x0)``: float32 ``[B, ...]``; ``x0`` is the next step's ``x0_prev``.
    """
    prediction_type = prediction_id("dpm_update", prediction_type)
    check_dpm_update_args(
        x, model_out, guidance, x0_prev, coefs, prediction_type, clip_sample, backend
    )
    return torch.ops.cpsample.dpm_update(
        x, model_out, guidance, x0_prev, coefs, prediction_type, clip_sample, backend
    )
