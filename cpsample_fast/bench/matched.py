"""The "quality matched" table: protected DDIM-50 against protected DPM-Solver++ on the demo's
digits model, speeds measured in this run beside the quality each reached.

The matched step count would come from ``scripts/dpm_quality_match.py`` (Fréchet distance at most
5% above DDIM-50's, cuts plain and blurred at most 2 points below, seeds 0–3 pooled, 128 samples
each, the demo's guidance); its pooled numbers are recorded below. At the demo's current guidance
no DPM-Solver++ step count matched (the same scale is far too strong for 5–20 steps), so the table
says so and times ``TIMED_DPM_STEPS``. ``cpsample bench --suite matched`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .records import Row
from .timing import measure

DDIM_STEPS = 50
# The fewest DPM-Solver++ steps with FD ≤ 1.05× DDIM-50's and cuts no lower than DDIM-50's
# minus 2 points (benchmarks/README.md, dpm_quality_match); None: none matched.
MATCHED_DPM_STEPS: int | None = None
TIMED_DPM_STEPS = 10  # timed when none matched
# (solver, steps) -> (Fréchet distance of the protected samples, replication rate > 0.98
# protected, cut vs the solver's own plain run), pooled, from benchmarks/dpm_quality_match/.
MATCHED_EVIDENCE: dict[tuple[str, int], tuple[float, float, float]] = {
    ("ddim", 50): (14.44, 0.000, 1.000),
    ("dpmsolver++", 5): (58.64, 0.051, 0.948),
    ("dpmsolver++", 6): (42.39, 0.029, 0.970),
    ("dpmsolver++", 8): (52.42, 0.002, 0.998),
    ("dpmsolver++", 10): (61.40, 0.000, 1.000),
    ("dpmsolver++", 12): (60.56, 0.000, 1.000),
    ("dpmsolver++", 15): (61.76, 0.000, 1.000),
    ("dpmsolver++", 20): (56.09, 0.000, 1.000),
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
    dpm_steps: int | None = None,
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

    dpm_steps = dpm_steps or MATCHED_DPM_STEPS or TIMED_DPM_STEPS
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
    matched = MATCHED_DPM_STEPS is not None and dpm_steps == MATCHED_DPM_STEPS
    head = "quality matched" if matched else "NOT quality matched (see benchmarks/README.md)"
    lines = [
        f"{head}: demo digits model, protected (s={guidance['scale']:g}, "
        f"α={guidance['alpha']:g}, {guidance['mode']}), batch {batch}, device {device}, "
        f"{torch.get_num_threads()} threads",
        f"{'sampler':<16} {'steps':>5} {'img/s':>8} {'[p20-p80]':>17} {'x DDIM':>7} "
        f"{'FD (pooled)':>11} {'repl >0.98':>10} {'cut':>6}",
    ]
    lines.append("-" * len(lines[-1]))
    for solver in ("ddim", "dpmsolver++"):
        steps, med, lo, hi = speed[solver]
        ev = MATCHED_EVIDENCE.get((solver, steps))
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
        "quality_matched": matched,
        "evidence": {f"{k[0]}-{k[1]}": v for k, v in MATCHED_EVIDENCE.items()},
    }
    return MatchedResult(rows=rows, table="\n".join(lines), summary=summary)
