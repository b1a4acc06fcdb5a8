"""Triton kernels for the fused ops, and their launchers.

Triton is optional: without it ``has_triton()`` is False and the kernels are not defined. Under
``TRITON_INTERPRET=1`` (set before this module is imported, as tests/conftest.py does) the same
kernels run on CPU tensors through Triton's interpreter.

Design of ``_guided_update_kernel`` (docs/CONTRACTS.md "The fused update"):

- One pass: loads of ``x``, ``model_out`` and (when present) ``guidance`` — or an explicit noise
  tensor instead of the in-kernel draw — and one store. Noise is drawn in-kernel with
  ``tl.philox(seed, j, i, k, 0)`` and Triton's own ``uint_to_uniform_float`` /
  ``pair_uniform_to_normal``, so it equals ``noise.step_noise`` (the torch reference) and
  ``tl.randn(seed, (i << 32) | j)``.
- 2-D grid ``(cdiv(N, BLOCK), B)``: the Philox counter words ``j`` (element in the sample) and
  ``i`` (sample) come straight from the program ids, so no per-element integer division / modulo
  (a 32-bit div+mod is ~20 instructions per element on NVIDIA GPUs, comparable to a third of a
  Philox round), and the sample's base offset is one scalar per program. The block axis is
  grid axis 0 (up to 2**31 - 1 programs); the batch is axis 1 (at most 65535 samples per
  launch; larger batches take one launch per 65535 samples). The price is a partly masked last
  block per sample when ``N % BLOCK != 0``.
- Coefficients and RNG state are read from device tensors inside the kernel: a new step needs
  no host sync and a CUDA-graph replay draws fresh noise.
- Divisions use ``tl.math.div_rn`` (IEEE round-to-nearest, like torch and CUDA's ``/``); Triton's
  plain ``/`` on float32 lowers to ``div.full.f32`` on NVIDIA GPUs (up to 2 ulp).
- Checked without a GPU by lowering to sm_90 PTX/cubin (tests/test_triton_kernels.py): with
  ``N`` and the pointers 16-divisible (Triton specialises on that at launch, true for image
  sizes such as 3·32·32) the streams use 128-bit ``ld/st.global.v4``; an odd ``N`` falls back to
  32-bit accesses. Note that ``tl.randn``'s ``sqrt`` lowers to ``sqrt.approx.ftz.f32`` and
  log/cos to libdevice, so GPU normals differ from the CPU torch/C++ ones by a few ulp.
- ``BLOCK = 1024`` with 4 warps on GPU: the usual choice for an elementwise, bandwidth-bound
  kernel (8 fp32 per thread per stream). It is not autotuned: autotuning needs host-side timing
  runs at first call and would fight CUDA-graph capture.
  Under the interpreter each program has a large fixed cost whatever its size, so the launcher
  uses one big block per sample there.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .. import guidance as _guidance

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the torch and _C backends need no extra package
    triton = None
    tl = None

GPU_BLOCK = 1024
GPU_NUM_WARPS = 4
INTERPRETER_MAX_BLOCK = 1 << 16
MAX_GRID_Y = 65535

from ..constants import NOISE_DRAW, NOISE_NONE, NOISE_TENSOR  # noqa: E402  (after the optional import)


def has_triton() -> bool:
    """True when Triton imports."""
    return triton is not None


def interpreter_active() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (they run on CPU)."""
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older Tritons
        return os.environ.get("TRITON_INTERPRET") == "1"
    return isinstance(_guided_update_kernel, InterpretedFunction)


def supports_device(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` in this process."""
    if triton is None:
        return False
    if device.type == "cuda":
        return not interpreter_active() and torch.cuda.is_available()
    if device.type == "cpu":
        return interpreter_active()
    return False


if triton is not None:

    @triton.jit
    def _clamp_keep_nan(v, c):
        """``clamp(v, -c, c)`` that keeps NaN, as ``torch.clamp``: ``tl.minimum``/``maximum``
        (and ``tl.clamp``) lower to min/max that return the bound for a NaN operand."""
        v = tl.where(v < -c, -c, v)
        return tl.where(v > c, c, v)

    @triton.jit
    def _x0_eps(x, o, sa, s1, PREDICTION_TYPE: tl.constexpr):
        """The model's own ``(x̂0, ε)`` per prediction type (0 epsilon, 1 v, 2 sample), as
        ``_torch._x0_eps``; ``sa``/``s1`` are the multistep solver's α_s/σ_s there (an unused ε
        is dropped by the compiler)."""
        if PREDICTION_TYPE == 0:
            eps = o
            x0 = tl.math.div_rn(x - s1 * o, sa)
        elif PREDICTION_TYPE == 1:
            x0 = sa * x - s1 * o
            eps = sa * o + s1 * x
        else:
            x0 = o
            eps = tl.math.div_rn(x - sa * o, s1)
        return x0, eps

    @triton.jit
    def _guided_update_kernel(
        x_ptr,  # [B, N] float32, x_t
        o_ptr,  # [B, N] float32, model output
        g_ptr,  # [B, N] float32 guidance term (unused unless HAS_GUIDANCE)
        z_ptr,  # [B, N] float32 explicit noise (unused unless NOISE_MODE == 1)
        coefs_ptr,  # [6] float32: sa, s1, sp, d, sigma, clip_range
        rng_ptr,  # [3] int64: seed, step k, sample_offset
        out_ptr,  # [B, N] float32
        n_per_sample,
        first_sample,  # batch position of this launch's first sample (chunks of 65535)
        PREDICTION_TYPE: tl.constexpr,  # 0 epsilon, 1 v_prediction, 2 sample
        CLIP_SAMPLE: tl.constexpr,
        HAS_GUIDANCE: tl.constexpr,
        NOISE_MODE: tl.constexpr,  # 0 none, 1 tensor, 2 in-kernel Philox
        BLOCK: tl.constexpr,
        CLIPPED_EPS: tl.constexpr = False,  # ε̂ = (x - sa·x̂0)/s1 (use_clipped_model_output)
    ):
        pid_block = tl.program_id(0)
        b = tl.program_id(1) + first_sample
        # element index inside the sample, int64: BLOCK·pid in int32 would wrap for samples of
        # 2**31+ elements, which the Philox counter (2**32) otherwise allows
        j = pid_block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = j < n_per_sample
        offs = b.to(tl.int64) * n_per_sample + j
        sa = tl.load(coefs_ptr + 0)
        s1 = tl.load(coefs_ptr + 1)
        sp = tl.load(coefs_ptr + 2)
        d = tl.load(coefs_ptr + 3)
        sigma = tl.load(coefs_ptr + 4)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0)
        # §3.1 x0 and eps from the model output
        x0, eps = _x0_eps(x, o, sa, s1, PREDICTION_TYPE)
        # §3.6a clip the model's own x0 (docs/CONTRACTS.md "The fused update")
        if CLIP_SAMPLE:
            c = tl.load(coefs_ptr + 5)
            x0 = _clamp_keep_nan(x0, c)
        # §3.6b guidance after the clip: the (x0, eps) pair moves consistently
        if HAS_GUIDANCE:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)
            x0 = x0 - tl.math.div_rn(s1, sa) * g
            eps = eps + g
        # §3.6c use_clipped_model_output: eps from the final x0
        if CLIPPED_EPS:
            eps = tl.math.div_rn(x - sa * x0, s1)
        # §3.7 DDIM update: sp·x0 + d·eps + sigma·z
        out = sp * x0 + d * eps
        if NOISE_MODE == 1:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0)
            out = out + sigma * z
        elif NOISE_MODE == 2:
            seed = tl.load(rng_ptr + 0)
            step = tl.load(rng_ptr + 1)
            sample = tl.load(rng_ptr + 2) + b
            c0 = j.to(tl.uint32)  # low 32 bits (j < 2**32 is checked by the op)
            zero = c0 * 0
            c1 = zero + sample.to(tl.uint32)  # truncation = low 32 bits, as noise.philox4x32
            c2 = zero + step.to(tl.uint32)
            w0, w1, _, _ = tl.philox(seed, c0, c1, c2, zero)  # c3 = stream 0 (step noise)
            u1 = tl.uint_to_uniform_float(w0)
            u2 = tl.uint_to_uniform_float(w1)
            z, _ = tl.pair_uniform_to_normal(u1, u2)
            out = out + sigma * z
        tl.store(out_ptr + offs, out, mask=mask)


if triton is not None:

    @triton.jit
    def _dpm_update_kernel(
        x_ptr,  # [N] float32, x_t
        o_ptr,  # [N] float32, model output
        g_ptr,  # [N] float32 guidance term (unused unless HAS_GUIDANCE)
        prev_ptr,  # [N] float32, previous x0
        coefs_ptr,  # [7] float32: alpha_s, sigma_s, A, B, C, R, clip_range
        out_ptr,  # [N] float32, x_{t'}
        x0_ptr,  # [N] float32, x0
        numel,
        PREDICTION_TYPE: tl.constexpr,
        CLIP_SAMPLE: tl.constexpr,
        HAS_GUIDANCE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """docs/CONTRACTS.md "The multistep update": csrc/cpsample/step_math.h
        ``dpm_update_element`` per element, four loads and two stores."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        alpha_s = tl.load(coefs_ptr + 0)
        sigma_s = tl.load(coefs_ptr + 1)
        A = tl.load(coefs_ptr + 2)
        B = tl.load(coefs_ptr + 3)
        C = tl.load(coefs_ptr + 4)
        R = tl.load(coefs_ptr + 5)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0)
        prev = tl.load(prev_ptr + offs, mask=mask, other=0.0)
        # §3.1 x0 from the model output
        x0, _ = _x0_eps(x, o, alpha_s, sigma_s, PREDICTION_TYPE)
        # §3.6a clip the model's own x0
        if CLIP_SAMPLE:
            x0 = _clamp_keep_nan(x0, tl.load(coefs_ptr + 6))
        # §3.6b guidance after the clip: x0 - (sigma_s/alpha_s)·G
        if HAS_GUIDANCE:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0)
            x0 = x0 - tl.math.div_rn(sigma_s, alpha_s) * g
        # DPM multistep update, in diffusers' operation order
        out = (A * x - B * x0) - C * (R * (x0 - prev))
        tl.store(out_ptr + offs, out, mask=mask)
        tl.store(x0_ptr + offs, x0, mask=mask)


def dpm_update(
    x: torch.Tensor,  # [B, ...] float32
    model_out: torch.Tensor,  # [B, ...] float32
    guidance: torch.Tensor | None,  # [B, ...] float32 or None
    x0_prev: torch.Tensor,  # [B, ...] float32
    coefs: torch.Tensor,  # [7] float32
    prediction_type: int,
    clip_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_dpm_update_kernel`` (inputs already validated). Returns ``(x_{t'}, x0)``."""
    if triton is None:
        raise RuntimeError("backend='triton' needs Triton: pip install triton")
    out = torch.empty_like(x)
    x0 = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out, x0
    if interpreter_active():
        block, num_warps = min(max(triton.next_power_of_2(numel), 16), INTERPRETER_MAX_BLOCK), 4
    else:
        block, num_warps = GPU_BLOCK, GPU_NUM_WARPS
    with _on_device(x):
        _dpm_update_kernel[(triton.cdiv(numel, block),)](
            x, model_out, guidance if guidance is not None else x, x0_prev, coefs, out, x0,
            numel, PREDICTION_TYPE=prediction_type, CLIP_SAMPLE=bool(clip_sample),
            HAS_GUIDANCE=guidance is not None, BLOCK=block, num_warps=num_warps,
            enable_fp_fusion=False,  # round like torch eager and the C++/CUDA kernels
        )  # fmt: skip
    return out, x0


def _block_size(n_per_sample: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for ``n_per_sample`` elements per sample."""
    if interpreter_active():
        return min(max(triton.next_power_of_2(n_per_sample), 16), INTERPRETER_MAX_BLOCK), 4
    return GPU_BLOCK, GPU_NUM_WARPS


def guided_update(
    x: torch.Tensor,  # [B, ...] float32
    model_out: torch.Tensor,  # [B, ...] float32
    guidance: torch.Tensor | None,  # [B, ...] float32 or None
    noise: torch.Tensor | None,  # [B, ...] float32 or None
    coefs: torch.Tensor,  # [6] float32
    rng: torch.Tensor,  # [3] int64
    prediction_type: int,
    clip_sample: bool,
    draw_noise: bool,
    use_clipped_model_output: bool = False,
) -> torch.Tensor:
    """Launch ``_guided_update_kernel`` (inputs already validated). Returns float32 like ``x``."""
    if triton is None:
        raise RuntimeError("backend='triton' needs Triton: pip install triton")
    out = torch.empty_like(x)
    batch = x.shape[0]
    n = x.numel() // batch if batch else 0
    if n == 0:
        return out
    if noise is not None:
        noise_mode = NOISE_TENSOR
    elif draw_noise:
        noise_mode = NOISE_DRAW
    else:
        noise_mode = NOISE_NONE
    block, num_warps = _block_size(n)
    with _on_device(x):
        for first in range(0, batch, MAX_GRID_Y):  # one launch unless batch > 65535
            _launch_update(x, model_out, guidance, noise, coefs, rng, out, n, first, block,
                           num_warps, prediction_type, clip_sample, noise_mode,
                           use_clipped_model_output)  # fmt: skip
    return out


def _on_device(t: torch.Tensor):
    """Make ``t``'s GPU current: Triton launches on the current device and its stream."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_update(x, model_out, guidance, noise, coefs, rng, out, n, first, block, num_warps,
                   prediction_type, clip_sample, noise_mode, clipped_eps=False):  # fmt: skip
    grid = (triton.cdiv(n, block), min(x.shape[0] - first, MAX_GRID_Y))
    _guided_update_kernel[grid](
        x,
        model_out,
        guidance if guidance is not None else x,  # never read without HAS_GUIDANCE
        noise if noise is not None else x,  # never read unless NOISE_MODE == 1
        coefs,
        rng,
        out,
        n,
        first,
        PREDICTION_TYPE=prediction_type,
        CLIP_SAMPLE=bool(clip_sample),
        CLIPPED_EPS=bool(clipped_eps),
        HAS_GUIDANCE=guidance is not None,
        NOISE_MODE=noise_mode,
        BLOCK=block,
        num_warps=num_warps,
        # no FMA contraction: round like torch eager and the C++/CUDA kernels (built with
        # -ffp-contract=off / --fmad=false), so every backend gives the same bits
        enable_fp_fusion=False,
    )


if triton is not None:

    @triton.jit
    def _guidance_seed_kernel(
        logits_ptr,  # [B] float, protector logits f
        scale_ptr,  # [] float32, s·√(1-ᾱ_t)
        c_ptr,  # [B] float32 out: VJP seed
        q_ptr,  # [B] float32 out: confidence
        m_ptr,  # [B] bool out: gate
        batch,
        tau,  # float32 gate threshold on |f|: guidance.gate_threshold_f32(α), from the host
        MODE: tl.constexpr,  # 0 repel, 1 attract, 2 entropy (guidance.MODES)
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < batch
        f = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.abs(f)
        q = tl.sigmoid(a)
        small = tl.sigmoid(-a)  # min(r, 1 - r), full precision near 0
        # the gate compares |f| with an exact host threshold (guidance.gate): tl.sigmoid lowers
        # to an approximate exp2 and a full-range division on GPU, which could flip it
        m = a > tau
        if MODE == 0:
            w = small
        elif MODE == 1:
            w = q
        else:
            r = tl.sigmoid(f)
            w = a * r * (1.0 - r)
        sign = tl.where(f > 0, 1.0, tl.where(f < 0, -1.0, 0.0))
        scale = tl.load(scale_ptr)
        c = scale * m.to(tl.float32) * w * sign
        tl.store(c_ptr + offs, c, mask=mask)
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)


def guidance_seed(
    logits: torch.Tensor,  # [B] float
    scale_t: torch.Tensor,  # [] float32
    alpha: float,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch ``_guidance_seed_kernel``: ``(c [B] f32, q [B] f32, gate [B] bool)`` in one pass.

    One launch instead of the ~10 small kernels of the torch version (the op is opaque to
    ``torch.compile``, so those would not be fused). Inputs already validated.
    """
    if triton is None:
        raise RuntimeError("backend='triton' needs Triton: pip install triton")
    batch = logits.shape[0]
    c = torch.empty(batch, dtype=torch.float32, device=logits.device)
    q = torch.empty_like(c)
    m = torch.empty(batch, dtype=torch.bool, device=logits.device)
    if batch == 0:
        return c, q, m
    block = min(max(triton.next_power_of_2(batch), 16), 1024)
    logits = logits.contiguous()  # a no-op for the usual [B] logits; a column view is copied
    tau = _guidance.gate_threshold_f32(alpha)  # exact gate threshold on |f| (host, float64)
    with _on_device(logits):
        _guidance_seed_kernel[(triton.cdiv(batch, block),)](
            logits, scale_t, c, q, m, batch, tau, MODE=mode, BLOCK=block
        )
    return c, q, m
