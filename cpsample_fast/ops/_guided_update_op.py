"""``cpsample::guided_update``: the fused step ``x_t → x_{t'}`` as one functional torch.library op.

The op (docs/ALGORITHM.md §3 steps 5–7, docs/CONTRACTS.md "The fused update") is opaque to
``torch.compile``: a compiled sampler calls it as one node, and it dispatches at run time to the
backend named by its ``backend`` argument:

- ``"torch"``:  pure PyTorch (``_torch.py``), the specification of the kernels;
- ``"triton"``: ``_triton.py`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``"cpp"``:    the C++ CPU kernel of ``cpsample_fast._C`` (``make build``);
- ``"cuda"``:   the CUDA kernel of ``cpsample_fast._C`` (built with a CUDA toolkit);
- ``"auto"``:   CUDA tensors → triton, else cuda, else torch; CPU tensors → cpp, else torch.

``coefs`` and ``rng`` are device tensors so neither a new step nor a CUDA-graph replay needs the
host, and compiled code never recompiles per step.
"""

from __future__ import annotations

import torch

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

NUM_COEFS = 6  # sa, s1, sp, d, sigma, clip_range
NUM_RNG = 3  # seed, step, sample_offset
_MAX_NUMEL_PER_SAMPLE = 1 << 32  # Philox counter word c0 is 32 bits


def check_guided_update_args(
    x: torch.Tensor,
    model_out: torch.Tensor,
    guidance: torch.Tensor | None,
    noise: torch.Tensor | None,
    coefs: torch.Tensor,
    rng: torch.Tensor,
    prediction_type: int,
    clip_sample: bool,
    draw_noise: bool,
    backend: str,
    contiguous: bool = False,
    use_clipped_model_output: bool = False,
) -> None:
    """Validate the op's arguments; raise ``TypeError``/``ValueError`` naming the bad one.

    The op accepts any strides (a channels_last protector returns a channels_last input
    gradient; inductor may hand a custom op other strides than the traced program had) and makes
    its inputs row-major itself, a no-op for the contiguous tensors the sampler passes.
    ``contiguous=True`` insists on row-major inputs (what the kernels themselves read).
    """
    op = "guided_update"
    check_x(op, x, contiguous)
    check_like_x(op, model_out, "model_out", x, contiguous)
    for name, t in (("guidance", guidance), ("noise", noise)):
        if t is not None:
            check_like_x(op, t, name, x, contiguous)
    check_small(op, coefs, "coefs", torch.float32, NUM_COEFS, x,
                "(sa, s1, sp, d, sigma, clip_range)")  # fmt: skip
    check_small(op, rng, "rng", torch.int64, NUM_RNG, x, "(seed, step, sample_offset)")
    check_options(op, prediction_type, clip_sample, backend, draw_noise=draw_noise,
                  use_clipped_model_output=use_clipped_model_output)  # fmt: skip
    n = x.numel() // x.shape[0] if x.shape[0] > 0 else 0
    if n >= _MAX_NUMEL_PER_SAMPLE:
        raise ValueError(
            f"guided_update: a sample of x has {n} elements; the Philox element counter allows "
            "fewer than 2**32"
        )


_IMPLS = backend_table(_torch.guided_update, _triton_impl.guided_update, "guided_update")


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "cpsample::guided_update",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor model_out, Tensor? guidance, Tensor? noise, Tensor coefs, Tensor rng, "
        "int prediction_type, bool clip_sample, bool draw_noise, str backend, "
        "bool use_clipped_model_output=False) -> Tensor"
    ),
)
def _guided_update_op(
    x, model_out, guidance, noise, coefs, rng, prediction_type, clip_sample, draw_noise, backend,
    use_clipped_model_output=False,
):  # fmt: skip
    # Arguments were checked once by the wrapper (eager) or the fake (tracing); the body trusts
    # them. Row-major for the kernels (the Philox counter is the row-major element index): no-ops
    # for the sampler's tensors, one copy for a caller's channels_last ones.
    x, model_out, guidance, noise = row_major(x, model_out, guidance, noise)
    impl = _IMPLS[resolve_backend(backend, x.device)]
    return impl(x, model_out, guidance, noise, coefs, rng, prediction_type, clip_sample, draw_noise,
                use_clipped_model_output)  # fmt: skip


@_guided_update_op.register_fake
def _guided_update_fake(
    x, model_out, guidance, noise, coefs, rng, prediction_type, clip_sample, draw_noise, backend,
    use_clipped_model_output=False,
):  # fmt: skip
    opts = (prediction_type, clip_sample, draw_noise, backend)
    check_guided_update_args(x, model_out, guidance, noise, coefs, rng, *opts,
                             use_clipped_model_output=use_clipped_model_output)  # fmt: skip
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, model_out, guidance, noise, coefs, _rng, prediction_type, clip_sample = inputs[:8]
    ctx.save_for_backward(x, model_out, guidance, coefs)
    ctx.prediction_type = prediction_type
    ctx.clip_sample = clip_sample
    ctx.use_clipped_model_output = bool(inputs[10]) if len(inputs) > 10 else False
    ctx.has_guidance = guidance is not None
    ctx.has_noise = noise is not None


def _backward(ctx, grad_out):
    x, model_out, guidance, coefs = ctx.saved_tensors
    gx, go, gg, gz = _torch.guided_update_backward(
        grad_out, x, model_out, guidance, coefs, ctx.prediction_type, ctx.clip_sample,
        ctx.use_clipped_model_output,
    )  # fmt: skip
    gg = gg if ctx.has_guidance else None
    gz = gz if ctx.has_noise else None
    # No gradient for coefs, rng and the non-tensor options.
    return gx, go, gg, gz, None, None, None, None, None, None, None


# Every backend computes the same function, so one backward (torch math) serves them all.
_guided_update_op.register_autograd(_backward, setup_context=_setup_context)


def guided_update(
    x: torch.Tensor,  # [B, ...] float32 contiguous, x_t
    model_out: torch.Tensor,  # [B, ...] float32, raw eps-model output
    guidance: torch.Tensor | None,  # [B, ...] float32 guidance term G (already scaled) or None
    noise: torch.Tensor | None,  # [B, ...] float32 explicit z or None
    coefs: torch.Tensor,  # [6] float32 on x's device: (sa, s1, sp, d, sigma, clip_range)
    rng: torch.Tensor,  # [3] int64 on x's device: (seed, step k, sample_offset)
    *,
    prediction_type: int | str,
    clip_sample: bool,
    draw_noise: bool,
    backend: str = "auto",
    use_clipped_model_output: bool = False,
) -> torch.Tensor:
    """Fused CPSample update ``x_t → x_{t'}`` (docs/ALGORITHM.md §3; docs/CONTRACTS.md).

    Computes ``x̂0 = clip(x0) - (s1/sa)·G`` (the clip only when ``clip_sample``: guidance acts
    after it), ``ε̂ = ε + G`` (or ``(x - sa·x̂0)/s1`` with ``use_clipped_model_output``) and
    ``x_{t'} = sp·x̂0 + d·ε̂ + σ·z`` per element in float32, where ``(x0, ε)`` come from
    ``model_out`` by ``prediction_type``.

    Args:
        x: ``[B, ...]`` float32, any strides (row-major needs no copy).
        model_out: like ``x``: the eps-model output (ε, v or x0 per ``prediction_type``).
        guidance: like ``x``: the guidance term ``G = s·√(1-ᾱ_t)·m·g``, or None for 0.
        noise: like ``x``: explicit ``z``; takes precedence over ``draw_noise``.
        coefs: float32 ``[6]`` on ``x.device``: ``(√ᾱ_t, √(1-ᾱ_t), √ᾱ', √(1-ᾱ'-σ²), σ, clip)``.
        rng: int64 ``[3]`` on ``x.device``: ``(seed, step k, sample_offset)``.
        prediction_type: 0/"epsilon", 1/"v_prediction" or 2/"sample".
        clip_sample: clamp ``x̂0`` to ``±clip_range``.
        draw_noise: without ``noise``, draw ``z`` from Philox (counter ``(j, sample_offset + b,
            k, 0)``, ``noise.step_noise``); else ``z = 0``.
        backend: "auto", "torch", "triton", "cpp" or "cuda".
        use_clipped_model_output: ``ε̂ = (x - sa·x̂0)/s1`` for every sample, as diffusers'
            ``DDIMScheduler.step(..., use_clipped_model_output=True)``.

    Returns:
        float32 ``[B, ...]``: ``x_{t'}``.
    """
    prediction_type = prediction_id("guided_update", prediction_type)
    opts = (prediction_type, clip_sample, draw_noise, backend)
    check_guided_update_args(
        x, model_out, guidance, noise, coefs, rng, *opts,
        use_clipped_model_output=use_clipped_model_output,
    )  # fmt: skip
    return torch.ops.cpsample.guided_update(
        x, model_out, guidance, noise, coefs, rng, *opts, use_clipped_model_output
    )
