"""The fused update op alone, per backend available on the device, at 1e5-1e8 elements.

Reported as GB/s (3 float32 reads + 1 write per element) beside the measured bandwidth of
``torch.empty_like(x).copy_(x)`` at the same size, in the same session.
"""

from __future__ import annotations

import pytest
import torch

from cpsample_fast.bench.records import Row
from cpsample_fast.bench.timing import synchronize
from cpsample_fast.bench.update_suite import (
    BYTES_PER_ELEMENT,
    COPY_BYTES_PER_ELEMENT,
    MATCH_RTOL,
    inner_calls,
    native_backends,
    update_inputs,
    update_providers,
)

from .conftest import bench_device, bench_repeats, bench_sizes

DEVICE = bench_device()
SIZES = bench_sizes(DEVICE) if DEVICE.type == "cpu" or torch.cuda.is_available() else ()
PROVIDER_NAMES = ["copy", *native_backends(DEVICE)] if SIZES else []
_COPY_GBPS: dict[int, float] = {}


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("provider", PROVIDER_NAMES)
def test_update(benchmark, collector, provider, numel):
    x, o, g, coefs, rng = update_inputs(numel, DEVICE)
    fn = update_providers(x, o, g, coefs, rng, [p for p in PROVIDER_NAMES if p != "copy"], None)[
        provider
    ]
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
    if provider != "copy":  # every backend reproduces the torch specification
        from cpsample_fast.ops import _torch as torch_ops

        with torch.no_grad():
            spec = torch_ops.guided_update(x, o, g, None, coefs, rng, 0, True, False)
        diff = (out - spec).abs().max().item()
        assert diff <= MATCH_RTOL * max(spec.abs().max().item(), 1.0), diff
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    n = x.numel()
    per_call = stats.stats.median / inner
    nbytes = (COPY_BYTES_PER_ELEMENT if provider == "copy" else BYTES_PER_ELEMENT) * n
    gbps = nbytes / per_call / 1e9
    lo = nbytes / (stats.stats.max / inner) / 1e9
    hi = nbytes / (stats.stats.min / inner) / 1e9
    benchmark.extra_info.update({"numel": n, "gbps": gbps})
    extra = {"shape": list(x.shape), "inner": inner, "source": "pytest-benchmark"}
    collector.rows.append(
        Row(
            "guided_update",
            provider,
            "forward",
            "bandwidth",
            "GB/s",
            "numel",
            n,
            gbps,
            lo,
            hi,
            extra,
        )
    )
    if provider == "copy":
        _COPY_GBPS[n] = gbps
    elif n in _COPY_GBPS:
        frac = gbps / _COPY_GBPS[n]
        collector.rows.append(
            Row(
                "guided_update",
                provider,
                "forward",
                "frac_of_copy",
                "ratio",
                "numel",
                n,
                frac,
                frac,
                frac,
                extra,
            )
        )
