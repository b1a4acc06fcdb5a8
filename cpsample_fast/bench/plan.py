"""One ``cpsample bench`` run as a library call: the options with their defaults applied
(:func:`plan_bench`), then the suites asked for, run in turn (:func:`run_plan`).

The command line only parses its options, calls these two functions with a :class:`RunLog`
(CSV + JSON as rows arrive) and prints the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..validation import check_int
from .configs import get_config
from .context import SamplerBenchSettings
from .providers import parse_providers
from .records import Row
from .report import format_table, summary
from .sampler_suite import run_sampler_bench
from .update_suite import (
    DEFAULT_SIZES,
    QUICK_SIZES,
    UpdateBenchSettings,
    format_update_table,
    run_update_bench,
    update_summary,
)

SUITES = ("sampler", "update", "all", "matched")


def resolve_device(name: str | None) -> torch.device:
    """``cpu`` or ``cuda`` (None: cuda when present); ValueError for anything else or a
    missing GPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch.cuda.is_available() is False")
    return device


@dataclass
class BenchPlan:
    """The suites of one run, each with its settings (None: not run).

    Attributes:
        device: where everything runs.
        name: the run's name in its JSON report (``<config>_<device>`` or ``matched_<device>``).
        sampler: the sampling suite's settings.
        update: the fused-update suite's settings.
        matched: keyword arguments of :func:`cpsample_fast.bench.matched.run_matched_bench`.
    """

    device: torch.device
    name: str
    sampler: SamplerBenchSettings | None = None
    update: UpdateBenchSettings | None = None
    matched: dict | None = None


def plan_bench(
    device: torch.device,
    *,
    suite: str = "all",
    config: str | None = None,
    quick: bool = False,
    batch: int | None = None,
    steps: int | None = None,
    providers=None,
    repeats: int | None = None,
    warmup: int = 1,
    scale: float = 2.0,
    alpha: float = 0.5,
    backend: str = "auto",
    accuracy: bool = True,
    accuracy_batch: int = 8,
    sizes=None,
    matched_steps: int | None = None,
) -> BenchPlan:
    """The settings of each suite of ``suite`` (the options of ``cpsample bench``; None: the
    configuration's or the suite's default; ``quick``: tiny sizes for tests and CI)."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    for name, value in (("batch", batch), ("steps", steps), ("repeats", repeats)):
        if value is not None:
            check_int(name, value, 1)
    repeats = repeats or (2 if quick else 3)
    if suite == "matched":
        if config is not None:
            raise ValueError("the matched suite runs the demo digits model; leave config unset")
        matched = {
            "batch": batch or (8 if quick else 128),
            "dpm_steps": None
            if matched_steps is None
            else check_int("matched_steps", matched_steps),
            "ddim_steps": steps or (4 if quick else 50),
            "repeats": repeats,
            "warmup": check_int("warmup", warmup, 0),
            "backend": backend,
        }
        return BenchPlan(device, f"matched_{device.type}", matched=matched)
    cfg = get_config(
        config or ("tiny" if quick else ("gpu35m" if device.type == "cuda" else "cifar"))
    )
    plan = BenchPlan(device, f"{cfg.name}_{device.type}")
    if suite in ("sampler", "all"):
        plan.sampler = SamplerBenchSettings(
            config=cfg, device=device, batch=batch or cfg.batch, steps=steps or cfg.steps,
            providers=parse_providers(providers, device, quick=quick), repeats=repeats,
            warmup=warmup, scale=scale, alpha=alpha, backend=backend, accuracy=accuracy,
            accuracy_batch=accuracy_batch,
        )  # fmt: skip
    if suite in ("update", "all"):
        counts = tuple(int(v) for v in sizes) if sizes else None
        if counts is not None and any(v < 1 for v in counts):
            raise ValueError(f"sizes must be positive element counts, got {list(sizes)}")
        counts = counts or (QUICK_SIZES if quick else DEFAULT_SIZES[device.type])
        plan.update = UpdateBenchSettings(
            device, counts, repeats=max(repeats, 3), compile=not quick
        )
    return plan


@dataclass
class BenchOutcome:
    """What a run measured: the printed tables, each suite's JSON summary, and whether any
    provider failed or mismatched."""

    tables: list[str] = field(default_factory=list)
    sections: dict = field(default_factory=dict)
    failed: bool = False

    @property
    def table(self) -> str:
        """Every suite's table, one after the other."""
        return "\n\n".join(self.tables)


def run_plan(
    plan: BenchPlan,
    progress: Callable[[str], None] | None = None,
    on_rows: Callable[[list[Row]], None] | None = None,
) -> BenchOutcome:
    """Run the suites of ``plan`` in turn (sampler, matched, update); ``progress`` and
    ``on_rows`` as in :func:`run_sampler_bench`."""
    out = BenchOutcome()
    if plan.sampler is not None:
        result = run_sampler_bench(plan.sampler, progress, on_rows)
        out.tables.append(format_table(result))
        out.sections["sampler"] = summary(result)
        out.failed |= bool(result.errors)
    if plan.matched is not None:
        from .matched import run_matched_bench

        matched = run_matched_bench(plan.device, progress=progress, **plan.matched)
        if on_rows is not None:
            on_rows(matched.rows)
        out.tables.append(matched.table)
        out.sections["matched"] = matched.summary
    if plan.update is not None:
        measurements, _, errors = run_update_bench(plan.update, progress, on_rows)
        out.tables.append(format_update_table(measurements, errors))
        out.sections["update"] = update_summary(plan.update, measurements, errors)
        out.failed |= bool(errors)
    return out
