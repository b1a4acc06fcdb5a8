"""The "quality matched" table: protected DDIM-50 against protected DPM-Solver++ at the fewest
steps whose quality and protection match it, on the demo's digits model.

The step count comes from ``scripts/dpm_quality_match.py`` (Fréchet distance at most 5% above
DDIM-50's, replication cut at most 2 points below, seeds 0–3 pooled, 128 samples each, the demo's
guidance settings when it was run); its pooled numbers are recorded below and
printed next to the speeds measured in this run. ``cpsample bench --suite matched`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .records import Row
from .timing import measure

DDIM_STEPS = 50
# The fewest DPM-Solver++ steps with FD ≤ 1.05× DDIM-50's and a cut no lower than DDIM-50's
# minus 2 points; the search and its numbers are in benchmarks/README.md (dpm_quality_match).
MATCHED_DPM_STEPS = 6
# (Fréchet distance of the protected samples, replication rate > 0.98 protected, cut vs the
# solver's own plain run), pooled; recorded from that run.
MATCHED_EVIDENCE: dict[str, tuple[float, float, float] | None] = {
    "ddim": (13.63, 0.947, 0.053),
    "dpmsolver++": (13.17, 0.125, 0.872),
}


@dataclass
class MatchedResult:
    rows: list  # Row records
    table: str
    summary: dict


def _demo_models(device):
    from ..cli import demo
    from ..models import load_digits_unet
    from ..protector import load_protector

    eps_model, _ = load_digits_unet()
    protector, _ = load_protector(demo._assets() / demo.PROTECTOR_ASSET)
    eps_model = eps_model.to(device).eval().requires_grad_(False)
    protector = protector.to(device).eval().requires_grad_(False)
    guidance = dict(scale=demo.DEFAULT_SCALE, alpha=demo.DEFAULT_ALPHA, mode=demo.DEFAULT_MODE)
    return eps_model, protector, guidance


def run_matched_bench(
    device: torch.device,
    *,
    batch: int = 128,
    dpm_steps: int = MATCHED_DPM_STEPS,
    ddim_steps: int = DDIM_STEPS,
    repeats: int = 3,
    warmup: int = 1,
    backend: str = "auto",
    compile: bool = False,
    progress=None,
) -> MatchedResult:
    """Time protected DDIM-``ddim_steps`` and DPM-Solver++-``dpm_steps`` on the demo model.

    Returns:
        ``MatchedResult``: CSV rows (op ``sample_matched``, metric ``images_per_s``), the printed
        table and a JSON-able summary (images/s of each and their ratio).
    """
    from ..sampler import CPSampler
    from ..schedule import NoiseSchedule

    eps_model, protector, guidance = _demo_models(device)
    schedule = NoiseSchedule()
    shape = (batch, 1, 16, 16)
    rows, speed = [], {}
    for solver, steps in (("ddim", ddim_steps), ("dpmsolver++", dpm_steps)):
        if progress is not None:
            progress(f"matched: {solver}-{steps}")
        kw = dict(solver=solver, backend=backend, compile=compile, **guidance)
        sampler = CPSampler(eps_model, protector, schedule, num_inference_steps=steps, **kw)
        timing, _ = measure(
            lambda s=sampler: s.sample(shape, seed=0, device=device),
            repeats=repeats,
            warmup=warmup,
            device=device,
        )
        ips = timing.scaled(1.0)
        speed[solver] = (steps, batch / ips.median, batch / ips.p80, batch / ips.p20)
        rows.append(
            Row(
                op="sample_matched",
                provider=f"{solver}-{steps}",
                mode="compile" if compile else "eager",
                metric="images_per_s",
                unit="img/s",
                x_name="batch",
                x=batch,
                median=batch / ips.median,
                p20=batch / ips.p80,
                p80=batch / ips.p20,
                extra={"steps": steps, "solver": solver, **guidance},
            )
        )
    ratio = speed["dpmsolver++"][1] / speed["ddim"][1]
    lines = [
        f"quality matched: demo digits model, protected (s={guidance['scale']:g}, "
        f"α={guidance['alpha']:g}, {guidance['mode']}), batch {batch}, device {device}, "
        f"{torch.get_num_threads()} threads",
        f"{'sampler':<16} {'steps':>5} {'img/s':>8} {'[p20-p80]':>17} {'x DDIM':>7} "
        f"{'FD (pooled)':>11} {'repl >0.98':>10} {'cut':>6}",
    ]
    lines.append("-" * len(lines[-1]))
    for solver in ("ddim", "dpmsolver++"):
        steps, med, lo, hi = speed[solver]
        ev = MATCHED_EVIDENCE.get(solver)
        q = (
            f"{ev[0]:>11.2f} {100 * ev[1]:>9.1f}% {100 * ev[2]:>5.1f}%"
            if ev
            else f"{'-':>11} {'-':>10} {'-':>6}"
        )
        band = f"[{lo:.1f}-{hi:.1f}]"
        lines.append(
            f"{solver:<16} {steps:>5} {med:>8.1f} {band:>17} {med / speed['ddim'][1]:>7.2f} {q}"
        )
    lines.append(
        "FD / replication / cut: scripts/dpm_quality_match.py, seeds 0-3 x 128 pooled "
        "(recorded in cpsample_fast/bench/matched.py)"
    )
    summary = {
        "batch": batch,
        "guidance": guidance,
        "ddim_steps": ddim_steps,
        "dpm_steps": dpm_steps,
        "images_per_s": {k: v[1] for k, v in speed.items()},
        "speedup_dpm_over_ddim": ratio,
        "evidence": MATCHED_EVIDENCE,
    }
    return MatchedResult(rows=rows, table="\n".join(lines), summary=summary)
