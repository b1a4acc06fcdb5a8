"""The fused update alone (``cpsample::guided_update``) per backend, as GB/s against a copy.

Bytes are counted as the op's minimum traffic: 3 float32 reads (x, model output, guidance) and
1 write per element = 16 bytes/element. The ceiling is the measured bandwidth of
``torch.empty_like(x).copy_(x)`` (1 read + 1 write = 8 bytes/element) at the same size, in the
same process, so ``frac_of_copy`` close to 1 means the op runs at memory speed.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .records import Row
from .report import short_error
from .timing import Timing, measure

OP = "guided_update"
BYTES_PER_ELEMENT = 16  # 3 float32 reads + 1 float32 write
COPY_BYTES_PER_ELEMENT = 8  # 1 read + 1 write
SAMPLE_NUMEL = 3 * 32 * 32  # one CIFAR-like sample; the batch is sized to reach the target
DEFAULT_SIZES = {"cpu": (10**5, 10**6, 10**7), "cuda": (10**5, 10**6, 10**7, 10**8)}
QUICK_SIZES = (10**4, 10**5)


@dataclass
class UpdateBenchSettings:
    """What to measure."""

    device: torch.device
    sizes: tuple[int, ...]
    backends: list[str] | None = None  # None: every backend that runs natively on the device
    repeats: int = 5
    warmup: int = 2
    compile: bool = True  # also time torch.compile of the pure-torch update ("torch+compile")

    def to_dict(self) -> dict:
        """JSON-able settings."""
        return {
            "device": str(self.device),
            "sizes": list(self.sizes),
            "backends": self.backends,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "compile": self.compile,
        }


@dataclass
class UpdateMeasurement:
    """One provider at one size."""

    provider: str
    numel: int
    timing: Timing
    gbps: tuple[float, float, float]  # median, p20, p80
    frac_of_copy: float | None


def native_backends(device: torch.device) -> list[str]:
    """Backends that run natively on ``device``; the Triton interpreter on a CPU is left out."""
    from .. import ops

    names = list(ops.available_backends(device))
    if device.type == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def update_inputs(numel: int, device: torch.device):
    """Seeded float32 ``(x, model output, guidance, coefficients, Philox words)`` of about
    ``numel`` elements, in CIFAR-like samples ``[B, 3, 32, 32]``."""
    B = max(1, round(numel / SAMPLE_NUMEL))
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (B, 3, 32, 32)
    x, o, g = (torch.randn(shape, generator=gen).to(device) for _ in range(3))  # [B, 3, 32, 32]
    coefs = torch.tensor([0.7, 0.7, 0.8, 0.6, 0.0, 1.0], device=device)
    rng = torch.tensor([0, 0, 0], dtype=torch.int64, device=device)
    return x, o, g, coefs, rng


def inner_calls(numel: int, device: torch.device) -> int:
    """Calls per timed repeat: each repeat stays above ~1 ms of work, so timer and launch gaps
    do not dominate."""
    per_call_bytes = BYTES_PER_ELEMENT * numel
    target = 4e8 if device.type == "cuda" else 2e7
    return int(min(200, max(1, target // per_call_bytes)))


def update_providers(
    x, o, g, coefs, rng, backends, compiled
) -> dict[str, Callable[[], torch.Tensor]]:
    """Zero-argument calls: the copy ceiling, each backend, and the compiled torch update."""
    from .. import ops

    kw = {"prediction_type": 0, "clip_sample": True, "draw_noise": False}
    calls: dict[str, Callable[[], torch.Tensor]] = {"copy": lambda: torch.empty_like(x).copy_(x)}
    for name in backends:
        calls[name] = lambda name=name: ops.guided_update(
            x, o, g, None, coefs, rng, backend=name, **kw
        )
    if compiled is not None:
        calls["torch+compile"] = lambda: compiled(x, o, g, None, coefs, rng, **kw)
    return calls


# max |provider - torch| over max(|torch|, 1): float32, same operation order in every backend
# (no FMA contraction), so anything above a few ulp is a wrong kernel, not rounding.
MATCH_RTOL = 1e-5


def update_measurement(name: str, n: int, timing: Timing, copy_gbps: float | None):
    """GB/s of ``timing`` at ``n`` elements, and its fraction of the copy's bandwidth."""
    nbytes = (COPY_BYTES_PER_ELEMENT if name == "copy" else BYTES_PER_ELEMENT) * n
    gbps = (nbytes / timing.median / 1e9, nbytes / timing.p80 / 1e9, nbytes / timing.p20 / 1e9)
    frac = None if copy_gbps is None or name == "copy" else gbps[0] / copy_gbps
    return UpdateMeasurement(name, n, timing, gbps, frac)


def update_rows(
    m: UpdateMeasurement, shape, inner: int, diff: float | None, tol: float
) -> list[Row]:
    """The CSV rows of one measurement: time, bandwidth and (not for the copy) its fraction."""
    per_element = COPY_BYTES_PER_ELEMENT if m.provider == "copy" else BYTES_PER_ELEMENT
    extra = {"shape": list(shape), "bytes_per_element": per_element, "inner": inner}
    if diff is not None:
        extra.update(max_abs_diff_vs_torch=diff, matches=diff <= tol)

    def row(metric: str, unit: str, values) -> Row:
        return Row(OP, m.provider, "forward", metric, unit, "numel", m.numel, *values, extra)

    us = m.timing.scaled(1e6)
    rows = [row("time", "us", (us.median, us.p20, us.p80)), row("bandwidth", "GB/s", m.gbps)]
    if m.frac_of_copy is not None:
        rows.append(row("frac_of_copy", "ratio", (m.frac_of_copy,) * 3))
    return rows


def run_update_bench(
    settings: UpdateBenchSettings,
    progress: Callable[[str], None] | None = None,
    on_rows: Callable[[list[Row]], None] | None = None,
) -> tuple[list[UpdateMeasurement], list[Row], dict[str, str]]:
    """Time the copy ceiling and each backend of the fused update at each size.

    Each backend's output is also checked against the torch specification
    (``ops.guided_update_spec``) on the same inputs: a mismatch is recorded in ``errors`` (the
    timing is kept).

    Args:
        settings: what to measure.
        progress: called with a short description before each measurement.
        on_rows: called with each provider's rows as soon as they are measured (a run killed by
            a time limit keeps them).

    Returns:
        ``(measurements, rows, errors)``; a provider that fails is recorded in ``errors``.
    """
    from ..ops import guided_update_spec

    say = progress or (lambda _msg: None)
    s = settings
    device = s.device
    backends = list(s.backends) if s.backends else native_backends(device)
    compiled = None
    if s.compile:
        compiled = torch.compile(guided_update_spec, fullgraph=True, dynamic=False)
    measurements: list[UpdateMeasurement] = []
    errors: dict[str, str] = {}
    rows: list[Row] = []
    for numel in s.sizes:
        x, o, g, coefs, rng = update_inputs(numel, device)
        n = x.numel()
        inner = inner_calls(n, device)
        providers = update_providers(x, o, g, coefs, rng, backends, compiled)
        with torch.no_grad():
            spec = guided_update_spec(x, o, g, None, coefs, rng, 0, True, False)
        spec_scale = max(float(spec.abs().max()), 1.0)
        copy_gbps = None
        for name, fn in providers.items():
            say(f"update {name} @ {n:.0e}")
            try:
                with torch.no_grad():
                    timing, out = measure(
                        fn, repeats=s.repeats, warmup=s.warmup, device=device, inner=inner
                    )
                    diff = None if name == "copy" else float((out - spec).abs().max())
                del out
            except Exception as exc:
                errors[f"{name}@{n}"] = f"{type(exc).__name__}: {exc}"
                errors[f"{name}@{n}:traceback"] = traceback.format_exc(limit=6)
                continue
            if diff is not None and not diff <= MATCH_RTOL * spec_scale:
                errors[f"{name}@{n}"] = (
                    f"MISMATCH: max |{name} - torch spec| = {diff:.3g} exceeds "
                    f"{MATCH_RTOL * spec_scale:.3g} (timed anyway)"
                )
            m = update_measurement(name, n, timing, copy_gbps)
            if name == "copy":
                copy_gbps = m.gbps[0]
            measurements.append(m)
            new_rows = update_rows(m, x.shape, inner, diff, MATCH_RTOL * spec_scale)
            rows += new_rows
            if on_rows is not None:
                on_rows(new_rows)
        del x, o, g, spec
    return measurements, rows, errors


def format_update_table(measurements: list[UpdateMeasurement], errors: dict[str, str]) -> str:
    """GB/s per provider (rows) and size (columns), with the fraction of copy bandwidth."""
    sizes = sorted({m.numel for m in measurements})
    names = list(dict.fromkeys(m.provider for m in measurements))
    by = {(m.provider, m.numel): m for m in measurements}
    head = f"{'update op (GB/s, x copy)':<26}" + "".join(f"{n:>20.1e}" for n in sizes)
    lines = [head, "-" * len(head)]
    for name in names:
        cells = []
        for n in sizes:
            m = by.get((name, n))
            if m is None:
                cells.append(f"{'-':>20}")
            elif m.frac_of_copy is None:
                cells.append(f"{m.gbps[0]:>20.1f}")
            else:
                cells.append(f"{f'{m.gbps[0]:.1f} ({m.frac_of_copy:.2f}x)':>20}")
        lines.append(f"{name:<26}" + "".join(cells))
    for key, msg in errors.items():
        if not key.endswith(":traceback"):
            lines.append(f"{key:<26} FAILED: {short_error(msg)}")
    lines.append("bytes: 3 reads + 1 write of float32 per element (copy: 1 read + 1 write)")
    return "\n".join(lines)


def update_summary(
    settings: UpdateBenchSettings, measurements: list[UpdateMeasurement], errors: dict[str, str]
) -> dict:
    """JSON-able summary of an update run (settings, GB/s per provider and size, errors)."""
    return {
        "settings": settings.to_dict(),
        "errors": errors,
        "measurements": [
            {
                "provider": m.provider,
                "numel": m.numel,
                "gbps": m.gbps[0],
                "frac_of_copy": m.frac_of_copy,
            }
            for m in measurements
        ],
    }
