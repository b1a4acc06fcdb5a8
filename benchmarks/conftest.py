"""Shared set-up of the pytest-benchmark files: one configuration, one CSV, same-run ratios.

Run with ``pytest benchmarks --benchmark-enable`` (the project's addopts disable benchmarks so
that plain test runs stay fast). Environment:

- ``CPSAMPLE_BENCH_DEVICE``: ``cpu`` / ``cuda`` (default: cuda when present);
- ``CPSAMPLE_BENCH_CONFIG``: ``tiny`` / ``cifar`` / ``gpu35m`` (default: gpu35m on cuda, cifar
  on cpu);
- ``CPSAMPLE_BENCH_BATCH``, ``CPSAMPLE_BENCH_STEPS``, ``CPSAMPLE_BENCH_REPEATS``: overrides;
- ``CPSAMPLE_BENCH_SIZES``: comma-separated element counts of the update benchmark;
- ``CPSAMPLE_BENCH_OUT``: folder of ``bench.csv`` (default ``.benchmarks/``, git-ignored).

Every measurement goes through ``cpsample_fast.bench`` (the same harness and providers as
``cpsample bench``); at the end of the session the rows, including speed-ups against the
reference measured in this same session, are appended to the CSV and printed.
"""

from __future__ import annotations

import os
from pathlib import Path

# Benchmarks measure real kernels: never the Triton interpreter.
if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("unset TRITON_INTERPRET before running benchmarks/ (it makes Triton slow)")

import pytest  # noqa: E402
import torch  # noqa: E402

from cpsample_fast.bench import Environment, Row, append_csv, get_config  # noqa: E402
from cpsample_fast.bench.context import SamplerBenchSettings, SamplingContext  # noqa: E402


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if parsed < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return parsed


def bench_device() -> torch.device:
    """The device from ``CPSAMPLE_BENCH_DEVICE`` (default: cuda when present)."""
    name = os.environ.get("CPSAMPLE_BENCH_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    return torch.device(name)


def bench_sizes(device: torch.device) -> tuple[int, ...]:
    """Element counts of the update benchmark."""
    from cpsample_fast.bench.update_suite import DEFAULT_SIZES

    raw = os.environ.get("CPSAMPLE_BENCH_SIZES")
    if not raw:
        return DEFAULT_SIZES[device.type]
    return tuple(int(float(v)) for v in raw.split(",") if v)


def bench_repeats() -> int:
    """Timed rounds per benchmark."""
    return _env_int("CPSAMPLE_BENCH_REPEATS", 3)


class _Collector:
    """Rows measured during the session, written once at its end."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.seconds: dict[tuple[str, str], tuple[float, float, float]] = {}


_COLLECTOR = _Collector()


@pytest.fixture(scope="session")
def collector() -> _Collector:
    """Where benchmark files put their rows (see ``pytest_sessionfinish``)."""
    return _COLLECTOR


@pytest.fixture(scope="session")
def sampling_context() -> SamplingContext:
    """Models, schedule and shared noise of the configured sampling benchmark."""
    device = bench_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CPSAMPLE_BENCH_DEVICE=cuda but no GPU is available")
    default = "gpu35m" if device.type == "cuda" else "cifar"
    config = get_config(os.environ.get("CPSAMPLE_BENCH_CONFIG", default))
    settings = SamplerBenchSettings(
        config=config,
        device=device,
        batch=_env_int("CPSAMPLE_BENCH_BATCH", config.batch),
        steps=_env_int("CPSAMPLE_BENCH_STEPS", config.steps),
        providers=[],
        repeats=bench_repeats(),
    )
    return SamplingContext(settings)


def pytest_sessionfinish(session, exitstatus):
    """Add same-session speed-ups against the reference, append every row to the CSV."""
    rows = list(_COLLECTOR.rows)
    if not rows:
        return
    for (op, provider), (med, p20, p80) in _COLLECTOR.seconds.items():
        ref = _COLLECTOR.seconds.get((op, "reference"))
        if ref is None:
            continue
        template = next(r for r in rows if r.op == op and r.provider == provider)
        rows.append(
            Row(
                op,
                provider,
                template.mode,
                "speedup_vs_reference",
                "x",
                template.x_name,
                template.x,
                ref[0] / med,
                ref[1] / p80,
                ref[2] / p20,
                template.extra,
            )
        )
    out = Path(os.environ.get("CPSAMPLE_BENCH_OUT") or Path(__file__).parents[1] / ".benchmarks")
    env = Environment.capture(bench_device())
    path = append_csv(out / "bench.csv", [row.to_record(env) for row in rows])
    _COLLECTOR.summary = [
        f"{r.op:<22} {r.provider:<20} {r.metric:<22} {r.median:>12.4g} {r.unit}"
        for r in rows
        if r.metric in ("images_per_s", "speedup_vs_reference", "bandwidth", "frac_of_copy")
    ] + [f"appended {len(rows)} rows to {path}"]


def pytest_terminal_summary(terminalreporter):
    """Print the headline numbers of this session (ratios measured in this same session)."""
    lines = getattr(_COLLECTOR, "summary", None)
    if lines:
        terminalreporter.section("cpsample benchmarks")
        for line in lines:
            terminalreporter.write_line(line)
