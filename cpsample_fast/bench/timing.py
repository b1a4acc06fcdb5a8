"""Wall-clock timing with warm-up, device synchronisation and median / p20 / p80 over repeats.

One function, :func:`measure`, is used by every suite (the ``cpsample bench`` command and the
pytest-benchmark files), so every number in a table was taken the same way.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU), so a timer sees finished work."""
    if device is None:
        return
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0 ≤ q ≤ 1) of ``values`` with linear interpolation (numpy's default)."""
    if not values:
        raise ValueError("percentile: values must not be empty")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile: q must be in [0, 1], got {q}")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the timed repeats (warm-up excluded).

    Attributes:
        median: median seconds per call.
        p20: 20th percentile (a fast call).
        p80: 80th percentile (a slow call).
        samples: every timed repeat, in order.
    """

    median: float
    p20: float
    p80: float
    samples: tuple[float, ...]

    @classmethod
    def from_samples(cls, samples: list[float]) -> Timing:
        """Summarise raw per-call seconds."""
        return cls(
            median=statistics.median(samples),
            p20=percentile(samples, 0.2),
            p80=percentile(samples, 0.8),
            samples=tuple(samples),
        )

    def scaled(self, factor: float) -> Timing:
        """The same timing with every value multiplied by ``factor`` > 0 (e.g. per step)."""
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        return Timing(
            self.median * factor,
            self.p20 * factor,
            self.p80 * factor,
            tuple(s * factor for s in self.samples),
        )


def measure(
    fn: Callable[[], object],
    *,
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    inner: int = 1,
) -> tuple[Timing, object]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Each timed repeat runs ``fn`` ``inner`` times between two device synchronisations and counts
    the mean, so sub-millisecond kernels are not dominated by the timer and launch gaps.

    Args:
        fn: the work; its last return value is handed back (to check results once).
        repeats: timed repeats (≥ 1); the summary is median / p20 / p80 over them.
        warmup: untimed calls first (compilation, allocator, caches, CUDA graph capture).
        device: synchronised around every timed repeat (CUDA); None or CPU needs nothing.
        inner: calls per timed repeat (≥ 1).

    Returns:
        ``(timing, last_result)``: seconds per call of ``fn``, and what its last call returned.
    """
    for name, value, lo in (("repeats", repeats, 1), ("warmup", warmup, 0), ("inner", inner, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    result = None
    for _ in range(warmup):
        result = fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            result = fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) / inner)
    return Timing.from_samples(samples), result
