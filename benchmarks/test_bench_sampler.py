"""Whole sampling calls per provider (reference, fused, compiled, bf16, CUDA graphs, DDIM floor).

The providers are ``cpsample_fast.bench.providers.PROVIDERS`` (the reference is the
package's ``reference_sample``); each round is one ``sample()`` call, synchronised on a GPU.
Fused and compiled providers must also reproduce the eager reference in the same model dtype.
"""

from __future__ import annotations

import pytest
import torch

from cpsample_fast.bench.providers import PROVIDERS
from cpsample_fast.bench.records import Row
from cpsample_fast.bench.timing import percentile, synchronize

from .conftest import bench_device

NAMES = [
    n
    for n in (
        "reference",
        "fused",
        "fused+compile",
        "fused+compile+bf16",
        "fused+cudagraph",
        "ddim",
    )
    if bench_device().type == "cuda" or not PROVIDERS[n].cuda_only
]


@pytest.mark.parametrize("provider", NAMES)
def test_sample(benchmark, sampling_context, collector, provider):
    ctx = sampling_context
    spec = PROVIDERS[provider]
    run, backend = ctx.make_runner(spec)
    device = ctx.device

    def call():
        out = run()
        synchronize(device)
        return out

    call()  # warm-up outside the timer: compilation, allocator, CUDA graph capture
    if spec.compile:
        call()
    s = ctx.settings
    out = benchmark.pedantic(call, rounds=s.repeats, iterations=1, warmup_rounds=0)
    assert out.shape == ctx.shape and torch.isfinite(out).all()
    if spec.fused:  # fast is only worth timing when it is right: the eager reference, same dtype
        diff, tol = ctx.accuracy.check(spec, out)
        print(f"{provider}: max |out - reference| = {diff:.3g} (tolerance {tol:.3g})")
        assert diff <= tol
    benchmark.extra_info.update(
        {"config": s.config.name, "batch": s.batch, "steps": s.steps, "backend": backend}
    )
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the call ran once, nothing was timed
        return
    data = list(stats.stats.data)  # the harness's quantiles (bench/timing.py)
    med, p20, p80 = stats.stats.median, percentile(data, 0.2), percentile(data, 0.8)
    op = f"sample/{s.config.name}"
    extra = {"steps": s.steps, "update_backend": backend, "source": "pytest-benchmark"}
    B, k = s.batch, 1000.0 / s.steps

    def row(metric, unit, median, p20, p80):
        return Row(op, provider, "sample", metric, unit, "batch", B, median, p20, p80, extra)

    collector.rows.append(row("images_per_s", "img/s", B / med, B / p80, B / p20))
    collector.rows.append(row("ms_per_step", "ms", med * k, p20 * k, p80 * k))
    collector.seconds[(op, provider)] = (med, p20, p80)
