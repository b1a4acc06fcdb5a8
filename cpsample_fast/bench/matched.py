"""The "quality matched" table: protected DDIM-50 against protected DPM-Solver++ on the demo's
digits model, speeds measured in this run beside the quality each reached.

Each sampler runs with its own shipped settings file: DDIM-50 with the demo's
(``assets/digits_guidance.json``), DPM-Solver++ with ``assets/digits_guidance_dpm.json``, which
``scripts/dpm_quality_match.py`` wrote for the fewest steps whose Fréchet distance is within 5%
of protected DDIM-50's and whose cuts (plain and blurred) are within 2 points, seeds 0–3 pooled
(128 samples each), re-scored on seeds 4–7. A gated guidance needs a solver's own scale: one
DPM-Solver++ step is several DDIM-50 steps long and the demo's scale overshoots in it
(benchmarks/README.md "Quality-matched DPM-Solver++"). The quality columns are read from the two
files; ``cpsample bench --suite matched`` times both here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .records import Row
from .timing import measure

DDIM_STEPS = 50
DDIM_SETTINGS = "digits_guidance.json"
DPM_SETTINGS = "digits_guidance_dpm.json"


@dataclass
class MatchedResult:
    rows: list  # Row records
    table: str
    summary: dict


@dataclass
class _Entry:
    """One sampler of the table: its settings (sampler options) and recorded quality."""

    solver: str
    sampler: dict  # CPSampler keyword arguments from the settings file
    evidence: dict | None  # {"frechet", "replication", "blurred"} of the protected samples
    source: str


def _entries(eps_model, protector) -> dict[str, _Entry]:
    from ..models.digits import ASSET_DIR
    from ..settings import load_settings, sampler_kwargs

    out = {}
    for solver, name in (("ddim", DDIM_SETTINGS), ("dpmsolver++", DPM_SETTINGS)):
        path = ASSET_DIR / name
        if not path.exists():
            continue
        loaded = load_settings(path, eps_model=eps_model, protector=protector)
        tuned = loaded.get("tuned", {})
        if solver == "ddim":
            ev = tuned.get("pooled_check", {}).get("cpsample")
            ev = ev and {"frechet": ev["frechet"], "replication": ev["replication_rate"],
                         "blurred": ev["blurred_rate"]}  # fmt: skip
        else:
            ev = tuned.get("search", {}).get("protected")
        out[solver] = _Entry(solver, sampler_kwargs(loaded), ev, f"assets/{name}")
    if "ddim" not in out:
        raise FileNotFoundError(f"the shipped settings {DDIM_SETTINGS} are missing")
    return out


def _demo_models(device):
    from ..eval.demo import PROTECTOR_ASSET
    from ..models import load_digits_unet
    from ..models.digits import ASSET_DIR
    from ..protector import load_protector

    eps_model, _ = load_digits_unet()
    protector, _ = load_protector(ASSET_DIR / PROTECTOR_ASSET)
    eps_model = eps_model.to(device).eval().requires_grad_(False)
    protector = protector.to(device).eval().requires_grad_(False)
    return eps_model, protector


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

    ``dpm_steps`` (default: the matched count of ``assets/digits_guidance_dpm.json``) and
    ``ddim_steps`` other than the recorded ones are timed with the same guidance, and the table
    then says they are not the quality-matched pair.

    Returns:
        ``MatchedResult``: CSV rows (op ``sample_matched``, metric ``images_per_s``), the printed
        table and a JSON-able summary (images/s of each and their ratio).
    """
    from ..sampler import CPSampler
    from ..schedule import NoiseSchedule

    eps_model, protector = _demo_models(device)
    entries = _entries(eps_model, protector)
    if "dpmsolver++" not in entries:  # no matched DPM settings: time it at the demo's guidance
        dpm = dict(entries["ddim"].sampler, num_inference_steps=10, solver="dpmsolver++")
        entries["dpmsolver++"] = _Entry("dpmsolver++", dpm, None, "the demo's guidance")
    recorded = {k: e.sampler["num_inference_steps"] for k, e in entries.items()}
    steps_of = {"ddim": ddim_steps, "dpmsolver++": dpm_steps or recorded["dpmsolver++"]}
    matched = all(e.evidence is not None for e in entries.values()) and steps_of == recorded
    schedule = NoiseSchedule()
    shape = (batch, 1, 16, 16)
    rows, speed = [], {}
    for solver, entry in entries.items():
        steps = steps_of[solver]
        if progress is not None:
            progress(f"matched: {solver}-{steps}")
        kw = {**entry.sampler, "num_inference_steps": steps, "backend": backend,
              "compile": compile}  # fmt: skip
        sampler = CPSampler(eps_model, protector, schedule, **kw)
        timing, _ = measure(
            lambda s=sampler: s.sample(shape, seed=0, device=device),
            repeats=repeats,
            warmup=warmup,
            device=device,
        )
        ips = timing.scaled(1.0)
        speed[solver] = (steps, batch / ips.median, batch / ips.p80, batch / ips.p20)
        guidance = {k: entry.sampler[k] for k in ("scale", "alpha", "mode")}
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
    table = _table(entries, speed, matched, batch, device, steps_of == recorded)
    summary = {
        "batch": batch,
        "guidance": {
            k: {g: e.sampler[g] for g in ("scale", "alpha", "mode")} for k, e in entries.items()
        },  # fmt: skip
        "ddim_steps": steps_of["ddim"],
        "dpm_steps": steps_of["dpmsolver++"],
        "images_per_s": {k: v[1] for k, v in speed.items()},
        "speedup_dpm_over_ddim": ratio,
        "quality_matched": matched,
        "evidence": {k: e.evidence for k, e in entries.items()},
        "settings": {k: e.source for k, e in entries.items()},
    }
    return MatchedResult(rows=rows, table=table, summary=summary)


def _table(entries, speed, matched, batch, device, recorded_steps) -> str:
    if matched:
        head = "quality matched"
    elif not recorded_steps:
        head = "NOT the quality-matched step counts (timed at other steps)"
    else:
        head = "NOT quality matched (no matched DPM-Solver++ settings shipped)"
    lines = [
        f"{head}: demo digits model, protected, batch {batch}, device {device}, "
        f"{torch.get_num_threads()} threads",
        f"{'sampler':<12} {'steps':>5} {'scale':>6} {'alpha':>5} {'img/s':>8} {'[p20-p80]':>15} "
        f"{'x DDIM':>6} {'FD':>6} {'repl':>6} {'blurred':>7}",
    ]
    lines.append("-" * len(lines[-1]))
    for solver, entry in entries.items():
        steps, med, lo, hi = speed[solver]
        ev = entry.evidence if recorded_steps else None
        q = (
            f"{ev['frechet']:>6.2f} {100 * ev['replication']:>5.2f}% {100 * ev['blurred']:>6.2f}%"
            if ev
            else f"{'-':>6} {'-':>6} {'-':>7}"
        )
        g = entry.sampler
        band = f"[{lo:.1f}-{hi:.1f}]"
        lines.append(
            f"{solver:<12} {steps:>5} {g['scale']:>6g} {g['alpha']:>5g} {med:>8.1f} {band:>15} "
            f"{med / speed['ddim'][1]:>6.2f} {q}"
        )
    lines.append(
        "FD / replication (pixel cosine > 0.98) / blurred: protected samples, seeds 0-3 x 128 "
        "pooled, from the settings files (" + ", ".join(e.source for e in entries.values()) + ")"
    )
    return "\n".join(lines)
