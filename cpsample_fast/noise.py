"""Counter-based Gaussian noise: Philox4x32-10 plus Triton's ``randn`` recipe, in plain torch.

This is the torch reference of the random numbers every backend draws (docs/ALGORITHM.md §4,
docs/CONTRACTS.md "Counter-based noise"). The normal value for (seed, sample index ``i``,
loop step ``k``, stream, element ``j``) is a pure function of those numbers:

    (w0, w1, _, _) = philox4x32_10(counter=(j, i, k, stream), key=(seed_lo, seed_hi))
    u = uint_to_uniform_float(w)            # Triton's conversion, float32
    n = sqrt(-2 log max(1e-7, u0)) * cos(2π u1)

so sample ``i`` draws the same noise alone, in any batch, or on any rank.

torch has no uint32 arithmetic, so the uint32 words live in int64 tensors (values in
``[0, 2**32)``), masked after every add. The 32×32→64-bit products of Philox would overflow int64,
so each product splits the (constant) multiplier into 16-bit halves: both partial products stay
below 2**48 and the high and low words are reassembled exactly (see ``_mulhilo``). Everything is
branch-free tensor math, so it runs on CPU and CUDA and traces under
``torch.compile(fullgraph=True)``; pass ``seed``/``step``/``sample_offset`` as int64 0-dim tensors
there so a new step does not recompile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Philox4x32 constants and the counter word c3 (which noise a draw belongs to) live in
# constants.py, mirrored in csrc/cpsample/step_math.h.
from .constants import (
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
    PHILOX_ROUNDS,
    SAMPLE_INDEX_LIMIT,
    STREAM_INITIAL,
    STREAM_MEMBERSHIP,  # noqa: F401  (re-exported: noise.STREAM_* names every stream)
    STREAM_STEP,
)

_MASK32 = 0xFFFFFFFF
_SIGN32 = 0x80000000
# Triton's uint_to_uniform_float scale for 32-bit words: the largest float32 s with
# (2**31 - 1) * s < 1 after rounding, so u lies in [0, 1).
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586  # rounded to float32 inside the multiply, as in Triton
_MIN_UNIFORM = 1.0e-7

IntLike = int | torch.Tensor


def _check_int_like(name: str, value: IntLike, *, lo: int, hi: int) -> None:
    """Raise unless ``value`` is a Python int in ``[lo, hi)`` or an integer 0-dim tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"{name} must be a Python int or an int64 0-dim tensor, got a tensor of "
                f"dtype {value.dtype} and shape {tuple(value.shape)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int or an int64 0-dim tensor, got {value!r}")
    if not lo <= value < hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}), got {value}")


def _as_word(value: torch.Tensor) -> torch.Tensor:
    """Low 32 bits of an integer tensor (two's complement), as a uint32 held in int64."""
    return value.to(torch.int64) & _MASK32


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * multiplier`` for uint32 ``a`` (int64) and a constant.

    With ``m = m_hi·2**16 + m_lo``: ``p_hi = a·m_hi`` and ``p_lo = a·m_lo`` are both < 2**48, and
    ``a·m = p_hi·2**16 + p_lo``. Hence ``hi = floor(a·m / 2**32) = (p_hi + (p_lo >> 16)) >> 16``
    (floor of a floor by an integer is the floor of the quotient) and
    ``lo = (p_lo + ((p_hi mod 2**16) << 16)) mod 2**32`` — exact, no int64 overflow anywhere.

    The fresh partial products are updated in place: eager Philox is bound by allocating new
    buffers, so fewer of them make it faster (timings in benchmarks/README.md).
    """
    p_hi = a * (multiplier >> 16)
    p_lo = a * (multiplier & 0xFFFF)
    hi = p_lo >> 16
    hi += p_hi
    hi >>= 16
    lo = p_hi
    lo &= 0xFFFF
    lo <<= 16
    lo += p_lo
    lo &= _MASK32
    return hi, lo


def philox4x32(
    seed: IntLike,
    c0: IntLike,
    c1: IntLike,
    c2: IntLike,
    c3: IntLike,
    *,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on broadcastable counters, bit-exact with ``tl.philox(seed, c0, c1, c2, c3)``.

    The key is ``(seed & 0xffffffff, (seed >> 32) & 0xffffffff)`` as in Triton. Counter words are
    taken modulo 2**32 (an int32 ``-1`` is the word ``0xffffffff``, as Triton's bitcast).

    Args:
        seed: Python int in ``[-2**63, 2**64)`` or an integer 0-dim tensor (its 64 bits).
        c0, c1, c2, c3: counter words; integer tensors (any broadcastable shapes) or Python ints.
            At least one of them must be a tensor (it fixes the device).
        rounds: number of Philox rounds (10 is the standard Philox4x32-10).

    Returns:
        The four output words as int64 tensors of the broadcast shape, values in ``[0, 2**32)``.
    """
    _check_int_like("seed", seed, lo=-(2**63), hi=2**64)
    words = [c0, c1, c2, c3]
    if not any(isinstance(w, torch.Tensor) for w in words):
        raise TypeError("philox4x32 needs at least one counter word as a tensor (sets the device)")
    for n, w in enumerate(words):
        if isinstance(w, torch.Tensor):
            if w.dtype.is_floating_point or w.dtype.is_complex or w.dtype == torch.bool:
                raise TypeError(f"c{n} must be an integer tensor, got dtype {w.dtype}")
        elif isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"c{n} must be an int or an integer tensor, got {w!r}")
    # The device of the counters that carry the shape (a 0-dim CPU scalar may come along).
    tensors = [w for w in words if isinstance(w, torch.Tensor)]
    device = next((w.device for w in tensors if w.dim() > 0), tensors[0].device)
    c0, c1, c2, c3 = (
        _as_word(w).to(device)
        if isinstance(w, torch.Tensor)
        # a fill, not torch.tensor: no host-to-device copy (a sync, and illegal while a CUDA
        # graph is being captured)
        else torch.full((), w & _MASK32, dtype=torch.int64, device=device)
        for w in words
    )
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64)
        k0 = seed & _MASK32
        k1 = (seed >> 32) & _MASK32
    else:
        k0 = seed & _MASK32
        k1 = (seed >> 32) & _MASK32
    # Full-shape words from the start, so every round can update its fresh tensors in place.
    shape = torch.broadcast_shapes(*(w.shape for w in (c0, c1, c2, c3)))
    c0, c1, c2, c3 = (w.expand(shape) for w in (c0, c1, c2, c3))
    for _ in range(rounds):
        # One Philox round, as triton.language.random.philox_impl:
        # (c0, c1, c2, c3) <- (hi(B·c2) ^ c1 ^ k0, lo(B·c2), hi(A·c0) ^ c3 ^ k1, lo(A·c0)).
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        hi_b ^= c1
        hi_b ^= k0
        hi_a ^= c3
        hi_a ^= k1
        c0, c1, c2, c3 = hi_b, lo_b, hi_a, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for uint32 words held in int64: float32 in ``[0, 1)``.

    Triton bitcasts the word to int32 and maps negative ``x`` to ``~x``; for a word ``w``
    that is ``w`` below 2**31 and ``w ^ 0xffffffff`` above. The result (< 2**31) is rounded to
    float32 and multiplied by the float32 scale, as in the kernel.
    """
    x = torch.where(words >= _SIGN32, words ^ _MASK32, words)
    return x.to(torch.float32) * _UNIFORM_SCALE


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Triton's ``pair_uniform_to_normal`` (first output) in float32: a standard normal."""
    u1 = torch.clamp_min(u1, _MIN_UNIFORM)
    theta = u2 * _TWO_PI
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta)


def philox_normal(
    seed: IntLike,
    sample_index: torch.Tensor,  # [B] int64 global sample indices
    step: IntLike,
    stream: IntLike,
    sample_shape: Sequence[int],
) -> torch.Tensor:
    """Standard normals for the given samples, by the counter-based contract (docs/ALGORITHM.md §4).

    Element ``j`` (row-major flat index inside one sample) of sample ``sample_index[b]`` uses the
    counter ``(j, sample_index[b], step, stream)``. With ``step = stream = 0`` this equals
    Triton's ``tl.randn(seed, (i << 32) | j)``.

    Args:
        seed: Python int or int64 0-dim tensor.
        sample_index: int64 tensor ``[B]``; its device is the output's device.
        step: loop step ``k`` (0-based), Python int or int64 0-dim tensor.
        stream: ``STREAM_STEP`` (0), ``STREAM_INITIAL`` (1), ``STREAM_MEMBERSHIP`` (2), or any
            counter word.
        sample_shape: shape of one sample, e.g. ``(C, H, W)``.

    Returns:
        float32 tensor ``[B, *sample_shape]`` on ``sample_index.device``.
    """
    if not isinstance(sample_index, torch.Tensor) or sample_index.dim() != 1:
        raise TypeError("sample_index must be a 1-D int64 tensor [B]")
    if sample_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"sample_index must be an int64 tensor, got dtype {sample_index.dtype}")
    _check_int_like("step", step, lo=0, hi=2**32)
    _check_int_like("stream", stream, lo=0, hi=2**32)
    sample_shape = tuple(int(s) for s in sample_shape)
    if any(s < 0 for s in sample_shape):
        raise ValueError(f"sample_shape must have non-negative sizes, got {sample_shape}")
    n = math.prod(sample_shape)
    j = torch.arange(n, dtype=torch.int64, device=sample_index.device)[None, :]  # [1, N]
    i = sample_index.to(torch.int64)[:, None]  # [B, 1]
    w0, w1, _, _ = philox4x32(seed, j, i, step, stream)
    z = box_muller(uint32_to_uniform(w0), uint32_to_uniform(w1))  # [B, N]
    return z.reshape(sample_index.shape[0], *sample_shape)


def _sample_indices(
    batch: int, sample_offset: IntLike, device: torch.device | str | None
) -> torch.Tensor:
    """``sample_offset + arange(batch)`` as int64 ``[B]``."""
    _check_int_like("sample_offset", sample_offset, lo=0, hi=SAMPLE_INDEX_LIMIT)
    return torch.arange(batch, dtype=torch.int64, device=device) + sample_offset


def _device_of(*values: object, device: torch.device | str | None) -> torch.device | str | None:
    """``device`` if given, else the device of the first tensor among ``values`` (else CPU)."""
    if device is not None:
        return device
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints (B, ...), got {shape!r}") from None
    if len(shape) < 1 or min(shape) < 0:
        raise ValueError(f"shape must be (B, ...) with non-negative sizes, got {shape}")
    return shape


def _stream_noise(seed, step, stream: int, shape, sample_offset, device) -> torch.Tensor:
    """The noise of one stream (docs/ALGORITHM.md §4) for samples ``sample_offset …
    sample_offset+B-1`` at loop step ``step``, on ``device`` or that of a tensor argument."""
    shape = _check_shape(shape)
    device = _device_of(seed, step, sample_offset, device=device)
    idx = _sample_indices(shape[0], sample_offset, device)
    return philox_normal(seed, idx, step, stream, shape[1:])


def initial_noise(
    seed: IntLike,
    shape: Sequence[int],
    sample_offset: IntLike = 0,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Initial noise ``x_T`` (stream 1, step 0) for samples ``sample_offset … sample_offset+B-1``.

    Args:
        seed: Python int or int64 0-dim tensor.
        shape: ``(B, *sample_shape)``, e.g. ``(B, C, H, W)``.
        sample_offset: global index of the first sample (int or int64 0-dim tensor).
        device: output device; defaults to the device of a tensor argument, else CPU.

    Returns:
        float32 ``[B, *sample_shape]``.
    """
    return _stream_noise(seed, 0, STREAM_INITIAL, shape, sample_offset, device)


def step_noise(
    seed: IntLike,
    step: IntLike,
    shape: Sequence[int],
    sample_offset: IntLike = 0,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-step noise ``z`` of loop step ``step`` (stream 0), as the fused kernels draw it:
    float32 ``[B, *sample_shape]``. ``step`` is the 0-based index in the sampling loop (int or
    int64 0-dim tensor); the other arguments as for :func:`initial_noise`."""
    return _stream_noise(seed, step, STREAM_STEP, shape, sample_offset, device)
