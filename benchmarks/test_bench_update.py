"""The fused update op alone, per backend available on the device, at 1e5-1e8 elements.

Reported as GB/s (3 float32 reads + 1 write per element) beside the measured bandwidth of
``torch.empty_like(x).copy_(x)`` at the same size, in the same session.
"""

from __future__ import annotations

import pytest
import torch

from cpsample_fast.bench.timing import Timing, synchronize
from cpsample_fast.bench.update_suite import (
    MATCH_RTOL,
    inner_calls,
    native_backends,
    update_inputs,
    update_measurement,
    update_providers,
    update_rows,
)
from cpsample_fast.ops import guided_update_spec

from .conftest import bench_device, bench_repeats, bench_sizes

DEVICE = bench_device()
SIZES = bench_sizes(DEVICE) if DEVICE.type == "cpu" or torch.cuda.is_available() else ()
PROVIDER_NAMES = ["copy", *native_backends(DEVICE)] if SIZES else []
_COPY_GBPS: dict[int, float] = {}


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("provider", PROVIDER_NAMES)
def test_update(benchmark, collector, provider, numel):
    x, o, g, coefs, rng = update_inputs(numel, DEVICE)
    backends = [p for p in PROVIDER_NAMES if p != "copy"]
    fn = update_providers(x, o, g, coefs, rng, backends, None)[provider]
    inner = inner_calls(x.numel(), DEVICE)

    def call():
        for _ in range(inner):
            out = fn()
        synchronize(DEVICE)
        return out

    with torch.no_grad():
        call()
        out = benchmark.pedantic(call, rounds=bench_repeats(), iterations=1, warmup_rounds=1)
    assert torch.isfinite(out).all()
    diff = None
    if provider != "copy":  # every backend reproduces the torch specification
        with torch.no_grad():
            spec = guided_update_spec(x, o, g, None, coefs, rng, 0, True, False)
        diff = (out - spec).abs().max().item()
        assert diff <= MATCH_RTOL * max(spec.abs().max().item(), 1.0), diff
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    n = x.numel()
    # per call, the harness's quantiles and rows (bench/update_suite.py)
    timing = Timing.from_samples([d / inner for d in stats.stats.data])
    m = update_measurement(provider, n, timing, _COPY_GBPS.get(n))
    if provider == "copy":
        _COPY_GBPS[n] = m.gbps[0]
    benchmark.extra_info.update({"numel": n, "gbps": m.gbps[0]})
    tol = None if diff is None else MATCH_RTOL * max(spec.abs().max().item(), 1.0)
    rows = update_rows(m, x.shape, inner, diff, tol)
    for row in rows:
        row.extra["source"] = "pytest-benchmark"
    collector.rows.extend(rows)
