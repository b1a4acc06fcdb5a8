"""The sampling benchmark: every provider of one configuration, timed in one process.

One run (:func:`run_sampler_bench`) builds a :class:`~.context.SamplingContext` (models, shared
``x_T``), computes the float64 baseline once (:mod:`.accuracy`), then per provider
(:mod:`.providers`): a first call (compilation included), the timed repeats, the check against
the reference, and the per-piece split (:mod:`.pieces`). :mod:`.report` turns the results into
CSV rows, the printed table and the JSON summary. ms/step is split into eps-model, protector
forward + backward and update by timing those pieces alone at the same shapes and dtypes.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from .accuracy import MATCH_RTOL, error, match_tolerance
from .context import SamplerBenchSettings, SamplingContext
from .memory import peak_memory_mib, reset_peak_memory
from .pieces import time_pieces
from .providers import (
    DEFAULT_PROVIDERS,
    PROVIDERS,
    QUICK_PROVIDERS,
    ProviderSpec,
    parse_providers,
)
from .records import Row
from .report import format_table, sampler_rows, short_error, summary
from .timing import Timing, measure

__all__ = [  # this module's own names, and the suite's names from where they live now
    "DEFAULT_PROVIDERS",
    "MATCH_RTOL",
    "PROVIDERS",
    "QUICK_PROVIDERS",
    "ProviderResult",
    "ProviderSpec",
    "SamplerBenchResult",
    "SamplerBenchSettings",
    "SamplingContext",
    "format_table",
    "match_tolerance",
    "parse_providers",
    "run_sampler_bench",
    "short_error",
    "summary",
]


@dataclass
class ProviderResult:
    """Everything measured for one provider."""

    name: str
    total: Timing  # seconds per sampling call
    first_call_s: float  # the first (warm-up) call, compilation included
    split: dict[str, Timing]  # per step: eps_model, protector, update (seconds)
    backend: str
    err_vs_fp64: float | None = None
    rms_err_vs_fp64: float | None = None
    err_ratio_same_dtype: float | None = None
    diff_vs_reference: float | None = None  # max |provider - reference in the same dtype|
    diff_tolerance: float | None = None
    speedup: tuple[float, float, float] | None = None  # (median, p20, p80) vs reference
    peak_mib: float | None = None  # GPU: allocator peak; CPU: process peak RSS (bench/memory.py)
    extra: dict = field(default_factory=dict)


@dataclass
class SamplerBenchResult:
    """The outcome of one run of the sampling suite."""

    settings: SamplerBenchSettings
    results: list[ProviderResult]
    errors: dict[str, str]
    gate_fraction: float | None
    rows: list[Row]


def _measure_provider(ctx: SamplingContext, spec: ProviderSpec, say) -> ProviderResult:
    """Time one provider, check it against the reference and split its step (raises on
    failure; :func:`run_sampler_bench` records that)."""
    s = ctx.settings
    run, backend = ctx.make_runner(spec)
    first, _ = measure(run, repeats=1, warmup=0, device=s.device)
    warm = s.warmup + (1 if spec.compile else 0)
    reset_peak_memory(s.device)
    total, samples = measure(run, repeats=s.repeats, warmup=max(warm - 1, 0), device=s.device)
    result = ProviderResult(spec.name, total, first.median, {}, backend)
    result.peak_mib = peak_memory_mib(s.device)
    # the error first: a CUDA-graph provider's output lives in its graph's memory pool
    ref64 = ctx.accuracy.baseline() if spec.guided else None
    if ref64 is not None:
        result.err_vs_fp64, result.rms_err_vs_fp64 = error(samples, ref64)
    if spec.fused:
        say(f"{spec.name}: check against the reference")
        result.diff_vs_reference, result.diff_tolerance = ctx.accuracy.check(spec, samples)
    else:
        ctx.accuracy.remember(spec, samples)
    del samples
    say(f"{spec.name}: split")
    result.split = time_pieces(ctx, spec, backend)
    return result


def _ratios(results: list[ProviderResult]) -> None:
    """Same-run ratios: speed-up against ``reference``, error against the same-dtype reference."""
    by_name = {r.name: r for r in results}
    ref = by_name.get("reference")
    for r in results:
        if ref is not None:
            # median ratio, and a conservative band: fast reference repeat vs slow provider one
            r.speedup = (
                ref.total.median / r.total.median,
                ref.total.p20 / r.total.p80,
                ref.total.p80 / r.total.p20,
            )
        spec = PROVIDERS[r.name]
        base = by_name.get(spec.base_name)
        base_err = None if base is None else base.err_vs_fp64
        if spec.guided and r.err_vs_fp64 is not None and base_err is not None and base_err > 0:
            r.err_ratio_same_dtype = r.err_vs_fp64 / base_err


def run_sampler_bench(
    settings: SamplerBenchSettings,
    progress: Callable[[str], None] | None = None,
    on_rows: Callable[[list[Row]], None] | None = None,
) -> SamplerBenchResult:
    """Measure every provider of ``settings`` in this process; failures are recorded, not raised.

    Providers are measured in the order given (the references first, see
    :func:`~.providers.parse_providers`, so that every later row carries its same-run ratios).

    Args:
        settings: what to measure.
        progress: called with a short description before each stage (for a progress bar).
        on_rows: called with each provider's rows as soon as it is measured (so a run killed
            by a time limit keeps what it measured).

    Returns:
        A :class:`SamplerBenchResult` with the CSV rows of every measured quantity.
    """
    say = progress or (lambda _msg: None)
    ctx = SamplingContext(settings)
    errors: dict[str, str] = {}
    gate_fraction = None
    if settings.accuracy:
        say(f"reference in float64 on {ctx.accuracy.count()} samples (accuracy baseline)")
        try:
            gate_fraction = ctx.accuracy.fp64()[1]
        except Exception as exc:  # keep measuring the speed even without the accuracy baseline
            errors["reference-fp64"] = f"{type(exc).__name__}: {exc}"
    results: list[ProviderResult] = []
    rows: list[Row] = []
    for name in settings.providers:
        spec = PROVIDERS[name]
        say(name)
        try:
            result = _measure_provider(ctx, spec, say)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            errors[name + ":traceback"] = traceback.format_exc(limit=8)
            continue
        diff, tol = result.diff_vs_reference, result.diff_tolerance
        if diff is not None and not diff <= tol:  # also catches NaN
            errors[name] = (
                f"MISMATCH: max |{name} - {spec.base_name}| = {diff:.3g} exceeds {tol:.3g} "
                "(timed anyway; its numbers are not trustworthy)"
            )
        results.append(result)
        _ratios(results)
        new_rows = sampler_rows(settings, [result], gate_fraction)
        rows += new_rows
        if on_rows is not None:
            on_rows(new_rows)
    return SamplerBenchResult(settings, results, errors, gate_fraction, rows)
