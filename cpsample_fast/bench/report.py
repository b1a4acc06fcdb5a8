"""The sampling suite's results as CSV rows, the printed table and a JSON summary.

Table columns: img/s, ms/step (median and p20-p80), the per-piece split (:mod:`.pieces`) and
``rest``, the speed-up against the reference measured in the same run, the error against the
float64 baseline (:mod:`.accuracy`), that error over the same-dtype reference's (the
low-precision accuracy rule: at most 2), peak memory (:mod:`.memory`) and the update backend.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .providers import PROVIDERS
from .records import Row

if TYPE_CHECKING:
    from .context import SamplerBenchSettings
    from .sampler_suite import ProviderResult, SamplerBenchResult

OP_PREFIX = "sample"


def sampler_rows(
    settings: SamplerBenchSettings, results: list[ProviderResult], gate_fraction: float | None
) -> list[Row]:
    """The CSV rows of ``results``: one per measured quantity (op ``sample/<config>``)."""
    s = settings
    B, steps = s.batch, s.steps
    op = f"{OP_PREFIX}/{s.config.name}"
    rows: list[Row] = []
    for r in results:
        spec = PROVIDERS[r.name]
        extra = {
            "config": s.config.name,
            "shape": list(s.config.shape(B)),
            "steps": steps,
            "scale": s.scale if spec.guided else 0.0,
            "alpha": s.alpha,
            "model_dtype": "bfloat16" if spec.bf16 else "float32",
            "protector_dtype": "bfloat16" if spec.bf16 and not spec.fp32_protector else "float32",
            "channels_last": spec.bf16,
            "compile": spec.compile,
            "update_backend": r.backend,
            "repeats": s.repeats,
            "gate_fraction": gate_fraction,
        }

        def row(metric, unit, median, p20, p80, r=r, extra=extra):
            rows.append(
                Row(op, r.name, "sample", metric, unit, "batch", B, median, p20, p80, extra)
            )

        t = r.total
        row("images_per_s", "img/s", B / t.median, B / t.p80, B / t.p20)
        per_step = t.scaled(1000.0 / steps)
        row("ms_per_step", "ms", per_step.median, per_step.p20, per_step.p80)
        for piece, timing in r.split.items():
            ms = timing.scaled(1000.0)
            row(f"{piece}_ms", "ms", ms.median, ms.p20, ms.p80)
        row("first_call_s", "s", r.first_call_s, r.first_call_s, r.first_call_s)
        if r.peak_mib is not None:
            row("peak_memory", "MiB", r.peak_mib, r.peak_mib, r.peak_mib)
        if r.speedup is not None:
            row("speedup_vs_reference", "x", *r.speedup)
        if r.err_vs_fp64 is not None:
            row("max_abs_err_vs_fp64", "abs", r.err_vs_fp64, r.err_vs_fp64, r.err_vs_fp64)
            row("rms_err_vs_fp64", "abs", r.rms_err_vs_fp64, r.rms_err_vs_fp64, r.rms_err_vs_fp64)
        if r.err_ratio_same_dtype is not None:
            v = r.err_ratio_same_dtype
            row("err_ratio_vs_reference_same_dtype", "x", v, v, v)
        if r.diff_vs_reference is not None:
            v = r.diff_vs_reference
            extra_tol = {**extra, "tolerance": r.diff_tolerance, "ok": v <= r.diff_tolerance}
            row("max_abs_diff_vs_reference", "abs", v, v, v, extra=extra_tol)
    return rows


def format_table(result: SamplerBenchResult) -> str:
    """The sampling suite as one plain-text table (what ``cpsample bench`` prints)."""
    s = result.settings
    lines = [
        f"cpsample bench: {s.config.about}; batch {s.batch}, {s.steps} DDIM steps, "
        f"scale {s.scale}, alpha {s.alpha}, device {s.device}, {torch.get_num_threads()} threads",
    ]
    if result.gate_fraction is not None:
        lines.append(f"gate open in {100 * result.gate_fraction:.0f}% of (step, sample) pairs")
    head = (
        f"{'provider':<20} {'img/s':>8} {'ms/step':>9} {'[p20-p80]':>15} {'eps':>8} "
        f"{'prot f+b':>8} {'update':>7} {'rest':>8} {'x ref':>6} {'err vs fp64':>11} "
        f"{'err/ref':>7} {'peak MiB':>8}  backend"
    )
    lines += [head, "-" * len(head)]
    for r in result.results:
        per = r.total.scaled(1000.0 / s.steps)
        pieces = {k: v.median * 1000.0 for k, v in r.split.items()}
        rest = per.median - sum(pieces.values())
        band = f"[{per.p20:.1f}-{per.p80:.1f}]"
        speed = f"{r.speedup[0]:.2f}" if r.speedup else "-"
        err = f"{r.err_vs_fp64:.2e}" if r.err_vs_fp64 is not None else "-"
        ratio = f"{r.err_ratio_same_dtype:.2f}" if r.err_ratio_same_dtype is not None else "-"
        prot = f"{pieces['protector']:.2f}" if "protector" in pieces else "-"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        lines.append(
            f"{r.name:<20} {s.batch / r.total.median:>8.2f} {per.median:>9.2f} {band:>15} "
            f"{pieces['eps_model']:>8.2f} {prot:>8} {pieces['update']:>7.3f} {rest:>8.2f} "
            f"{speed:>6} {err:>11} {ratio:>7} {peak:>8}  {r.backend}"
        )
    for name, msg in result.errors.items():
        if not name.endswith(":traceback"):
            lines.append(f"{name:<20} FAILED: {short_error(msg)}")
    lines.append(
        "ms columns are per step (median); eps / prot f+b / update timed alone at the same shapes; "
        "x ref = reference median / provider median; err/ref = error vs fp64 over the reference's "
        "in the same model dtype (rule: <= 2); peak MiB = CUDA allocator peak, or the process's "
        "peak RSS on the CPU, over the timed calls."
    )
    return "\n".join(lines)


def short_error(msg: str, width: int = 200) -> str:
    """The first two non-empty lines of an error message, on one line (for tables)."""
    parts = [line.strip() for line in msg.splitlines() if line.strip()][:2]
    return " ".join(parts)[:width]


def summary(result: SamplerBenchResult) -> dict:
    """JSON-able summary of the run (settings, per-provider numbers, errors)."""
    out = []
    for r in result.results:
        out.append(
            {
                "provider": r.name,
                "seconds_per_call": {
                    "median": r.total.median,
                    "p20": r.total.p20,
                    "p80": r.total.p80,
                },
                "samples_s": list(r.total.samples),
                "images_per_s": result.settings.batch / r.total.median,
                "first_call_s": r.first_call_s,
                "peak_memory_mib": r.peak_mib,
                "split_ms": {k: v.median * 1000.0 for k, v in r.split.items()},
                "speedup_vs_reference": None if r.speedup is None else r.speedup[0],
                "max_abs_err_vs_fp64": r.err_vs_fp64,
                "rms_err_vs_fp64": r.rms_err_vs_fp64,
                "err_ratio_vs_reference_same_dtype": r.err_ratio_same_dtype,
                "max_abs_diff_vs_reference": r.diff_vs_reference,
                "diff_tolerance": r.diff_tolerance,
                "update_backend": r.backend,
            }
        )
    return {
        "settings": result.settings.to_dict(),
        "gate_fraction": result.gate_fraction,
        "providers": out,
        "errors": result.errors,
        "finite": all(math.isfinite(p["images_per_s"]) for p in out),
    }
