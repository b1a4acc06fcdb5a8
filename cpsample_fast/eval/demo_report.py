"""The demo's outputs: PNGs, ``report.json``, the samples, and the printed table.

:func:`write_demo_outputs` writes everything a :class:`~cpsample_fast.eval.demo.DemoResult`
holds into its ``config.out``; :func:`demo_table` is the text ``cpsample demo`` prints.
"""

from __future__ import annotations

import time


def _fmt_rate(r: float) -> str:
    return f"{100 * r:5.1f}%"


def write_demo_outputs(result, split, pmeta: dict, t_all: float) -> None:
    """Plots (timed as ``plots``), then ``report.json`` and ``samples_<sampler>.npz``."""
    import numpy as np

    from ..io import atomic_path, write_json_atomic

    out = result.config.out
    t0 = time.perf_counter()
    save_demo_plots(result, split, pmeta)
    result.times["plots"] = time.perf_counter() - t0
    result.times["total"] = time.perf_counter() - t_all
    result.report = demo_report(result, split)
    write_json_atomic(out / "report.json", result.report)
    for k, x in result.samples.items():  # for `cpsample evaluate --samples samples_<k>.npz`
        with atomic_path(out / f"samples_{k}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, samples=x.cpu().numpy())


def save_demo_plots(result, split, pmeta: dict) -> None:
    """Sample grids, nearest pairs, membership ROC, the confidence trace, the protector's
    accuracy and replication against cost."""
    from ..protector import ProtectorReport
    from ..tune import save_cost_png
    from .membership import save_roc
    from .plots import save_image_grids, save_lines_png
    from .replication import save_pairs_grid

    c, out, samples, rej = result.config, result.config.out, result.samples, result.rejection
    grids = {
        "plain DDIM": samples["ddim"],
        f"CPSample (s={c.scale:g}, α={c.alpha:g}, {c.mode})": samples["cpsample"],
    }
    if "cpsample_dpm" in samples:
        grids[f"CPSample, {_fast_name(result)} (s={result.fast['scale']:g}, "
              f"α={result.fast['alpha']:g})"] = samples["cpsample_dpm"]  # fmt: skip
    if "rejection" in samples:
        grids[f"rejection (α={c.alpha:g}, {rej.n_accepted} kept)"] = samples["rejection"]
    save_image_grids(grids, out / "samples.png")
    for k, x in samples.items():
        save_pairs_grid(x, split.members, result.replication[k], out / f"nearest_pairs_{k}.png",
                        n=12)  # fmt: skip
    save_roc([result.membership_eps, result.membership_eps_hat], out / "membership_roc.png")
    tr = result.trace
    steps_t = tr.timesteps.cpu().numpy()
    series = {
        "mean confidence q": (steps_t, tr.confidence.nanmean(1).cpu().numpy()),
        "gate open (fraction)": (steps_t, tr.gate_fraction().cpu().numpy()),
    }
    for b in range(min(4, c.n)):
        series[f"sample {b} q"] = (steps_t, tr.confidence[:, b].cpu().numpy())
    save_lines_png(series, out / "confidence_trace.png",
                   xlabel="timestep t (sampling runs right to left)",
                   ylabel="protector confidence / gate", invert_x=True, hlines=[1 - c.alpha],
                   title="CPSample: per-step protector confidence")  # fmt: skip
    ProtectorReport.from_dict(pmeta["report"]).plot(out / "protector_accuracy.png")
    save_cost_png(_cost_points(result), out / "replication_vs_cost.png")


def _cost_points(result) -> dict:
    """``sampler -> (model evaluations per image, replication cut)`` for the cost plot."""
    c, rej, P = result.config, result.rejection, result.config.primary_threshold
    points = {
        "ddim": (float(c.steps), 0.0),
        "cpsample": (float(c.steps), result.cut_of(result.replication["cpsample"].rate(P)) or 0.0),
    }
    if "cpsample_dpm" in result.samples:
        rate = result.replication["cpsample_dpm"].rate(P)
        points["cpsample_dpm"] = (float(result.fast["num_inference_steps"]),
                                  result.cut_of(rate) or 0.0)  # fmt: skip
    if "rejection" in result.samples and result.replication["ddim"].rate(P):
        points["rejection"] = (rej.evals_per_accepted,
                               result.cut_of(result.replication["rejection"].rate(P)))  # fmt: skip
    elif rej is not None:  # nothing kept: the evaluations spent are a lower bound per image
        points["rejection"] = (float(rej.model_evaluations), None)
    return points


def _cost(result) -> dict:
    c, rej = result.config, result.rejection
    cost = {
        "ddim": {"model_evaluations_per_image": c.steps, "protector_evaluations_per_image": 0},
        "cpsample": {
            "model_evaluations_per_image": c.steps,
            "protector_evaluations_per_image": result.guided_steps,
            "note": "each guided step also runs the protector forward + one input-gradient VJP",
        },
    }
    if result.fast is not None:
        cost["cpsample_dpm"] = {
            "model_evaluations_per_image": result.fast["num_inference_steps"],
            "protector_evaluations_per_image": result.fast_guided_steps,
        }
    if rej is not None:
        kept = rej.n_accepted
        cost["rejection"] = {
            "model_evaluations_per_image": rej.evals_per_accepted if kept else None,
            "protector_evaluations_per_image": rej.protector_evaluations / kept if kept else None,
            "acceptance_rate": rej.acceptance_rate,
        }
    return cost


def demo_summary(result, cost: dict) -> dict:
    """The headline numbers of ``report.json`` (at the primary threshold)."""
    c, reps, blurs, rej = result.config, result.replication, result.blurred, result.rejection
    P = c.primary_threshold
    quals = result.quality
    real_blur = result.calibration_blurred.rate(P)
    blur_limit = 2 * real_blur + 0.01
    summary = {
        "ddim_replication_rate": reps["ddim"].rate(P),
        "cpsample_replication_rate": reps["cpsample"].rate(P),
        "replication_cut": result.cut_of(reps["cpsample"].rate(P)),
        "fd_ratio_cpsample_over_ddim": quals["cpsample"].frechet_distance
        / max(quals["ddim"].frechet_distance, 1e-12),
        "gate_open_fraction": float(result.trace.gate.float().mean()),
        "blur_sigma_px": c.blur_sigma,
        "ddim_blurred_rate": blurs["ddim"].rate(P),
        "cpsample_blurred_rate": blurs["cpsample"].rate(P),
        "heldout_real_blurred_rate": real_blur,
        "blurred_target": blur_limit,
        "blurred_target_met": blurs["cpsample"].rate(P) <= blur_limit,
        "membership_eps_hat_auc_two_sided": result.membership_eps_hat.auc_two_sided,
        "membership_eps_hat_abs_z": result.membership_eps_hat.abs_z,
        "membership_eps_auc_two_sided": result.membership_eps.auc_two_sided,
    }
    if "cpsample_dpm" in result.samples:
        summary.update({
            "cpsample_dpm_sampler": _fast_name(result),
            "cpsample_dpm_replication_rate": reps["cpsample_dpm"].rate(P),
            "cpsample_dpm_replication_cut": result.cut_of(reps["cpsample_dpm"].rate(P)),
            "cpsample_dpm_blurred_rate": blurs["cpsample_dpm"].rate(P),
            "fd_ratio_cpsample_dpm_over_ddim": quals["cpsample_dpm"].frechet_distance
            / max(quals["ddim"].frechet_distance, 1e-12),
            "sampling_speedup_cpsample_dpm_over_cpsample": result.times["sample_cpsample"]
            / max(result.times["sample_cpsample_dpm"], 1e-12),
        })  # fmt: skip
    if rej is not None:
        kept = "rejection" in reps
        summary.update(
            rejection_acceptance_rate=rej.acceptance_rate,
            rejection_accepted=rej.n_accepted,
            rejection_drawn=rej.n_drawn,
            rejection_exhausted=rej.exhausted,
            rejection_model_evaluations_per_image=cost["rejection"]["model_evaluations_per_image"],
            rejection_replication_rate=reps["rejection"].rate(P) if kept else None,
            rejection_replication_cut=result.cut_of(reps["rejection"].rate(P)) if kept else None,
            cpsample_cost_fraction_of_rejection=(
                c.steps / rej.evals_per_accepted if rej.n_accepted else 0.0
            ),
        )
    return summary


def demo_report(result, split) -> dict:
    """The content of ``report.json``."""
    c, rej = result.config, result.rejection
    cost = _cost(result)
    return {
        "setting": {
            "data": "sklearn digits 16x16, [-1, 1]",
            "members": int(split.members.shape[0]),
            "evaluation_nonmembers": int(split.evaluation.shape[0]),
            "n_samples": c.n,
            "num_inference_steps": c.steps,
            "seed": c.seed,
            "scale": c.scale,
            "alpha": c.alpha,
            "mode": c.mode,
            "guidance_range": None if c.guidance_range is None else list(c.guidance_range),
            "thresholds": list(c.thresholds),
            "primary_threshold": c.primary_threshold,
            "blur_sigma_px": c.blur_sigma,
            "rejection_budget": c.budget,
            "sources": result.sources,
        },
        "replication": {k: r.to_dict() for k, r in result.replication.items()},
        "replication_heldout_real_digits": result.calibration.to_dict(),
        "replication_blurred": {k: r.to_dict() for k, r in result.blurred.items()},
        "replication_blurred_heldout_real_digits": result.calibration_blurred.to_dict(),
        "quality": {k: q.to_dict() for k, q in result.quality.items()},
        "membership": {
            "eps": result.membership_eps.to_dict(),
            "eps_hat": result.membership_eps_hat.to_dict(),
        },
        "rejection": None if rej is None else rej.to_dict(),
        "cost": cost,
        "summary": demo_summary(result, cost),
        "seconds": result.times,
    }


def _table_rows(result) -> list[tuple]:
    """The rows of the comparison table: one column per sampler, then the real digits."""
    c, rej, samples = result.config, result.rejection, result.samples
    reps, blurs, quals = result.replication, result.blurred, result.quality
    fast = "cpsample_dpm" in samples
    names = ["ddim", "cpsample"] + (["cpsample_dpm"] if fast else [])
    names += ["rejection"] if rej is not None else []
    short = f"CPSample DPM-{result.fast['num_inference_steps']}" if fast else ""
    header = ["", "plain DDIM", "CPSample"] + ([short] if fast else [])
    header += ["rejection"] if rej is not None else []
    rows = [(*header, "real held-out")]

    def per(fn, real=""):
        return [fn(k) if k in samples else "-" for k in names] + [real]

    for t in c.thresholds:
        real = _fmt_rate(result.calibration.rates[t])
        label = f"replication > {t:g}"
        rows.append((label, *per(lambda k, t=t: _fmt_rate(reps[k].rates[t]), real)))
    for t in c.thresholds:
        real = _fmt_rate(result.calibration_blurred.rates[t])
        label = f"blurred σ={c.blur_sigma:g}px > {t:g}"
        rows.append((label, *per(lambda k, t=t: _fmt_rate(blurs[k].rates[t]), real)))
    real = _fmt_rate(result.calibration.carlini_rate)
    rows.append(("Carlini l2 extraction", *per(lambda k: _fmt_rate(reps[k].carlini_rate), real)))
    d_rep, d_real = result.report["replication"], result.report["replication_heldout_real_digits"]
    for key, label in (("similarity_mean", "NN similarity mean"),
                       ("similarity_max", "NN similarity max")):  # fmt: skip
        rows.append((label, *per(lambda k, key=key: f"{d_rep[k][key]:.4f}", f"{d_real[key]:.4f}")))

    def fd(k):
        return f"{quals[k].frechet_distance:.2f}" if k in quals else "-"

    def kid(k):
        return f"{100 * quals[k].kid_mean:.2f}" if k in quals else "-"

    rows.append(("Frechet dist. to held-out", *per(fd)))
    rows.append(("KID x100", *per(kid)))
    e, h = result.membership_eps, result.membership_eps_hat
    for label, a, b in (("membership eps/eps_hat: 2-sided AUC", e.auc_two_sided, h.auc_two_sided),
                        ("  |z|", e.abs_z, h.abs_z), ("  one-sided AUC", e.auc, h.auc),
                        ("  one-sided z", e.z, h.z),
                        ("  TPR @ 1% FPR", e.tpr_at_1pct_fpr, h.tpr_at_1pct_fpr)):  # fmt: skip
        rows.append((label, f"{a:.3f}", f"{b:.3f}", *(["-"] if fast else []),
                     *(["(= eps)"] if rej is not None else []), ""))  # fmt: skip
    costs = [str(c.steps), f"{c.steps} (+{result.guided_steps} prot.)"]
    times_row = [f"{result.times['sample_ddim']:.1f}", f"{result.times['sample_cpsample']:.1f}"]
    if fast:
        costs.append(f"{result.fast['num_inference_steps']} (+{result.fast_guided_steps} prot.)")
        times_row.append(f"{result.times['sample_cpsample_dpm']:.1f}")
    if rej is not None:
        costs.append(f"{rej.evals_per_accepted:.0f}" if rej.n_accepted else "inf (0 kept)")
        times_row.append(f"{result.times['sample_rejection']:.1f}")
    rows.append(("model evals per image", *costs, ""))
    rows.append(("sampling time (s)", *times_row, ""))
    return rows


def demo_table(result) -> str:
    """What ``cpsample demo`` prints: the setting, the table, and the headline lines."""
    c, rej, sources = result.config, result.rejection, result.sources
    s = result.report["summary"]
    rows = _table_rows(result)
    w = max(len(r[0]) for r in rows)
    lines = [
        f"CPSample demo: {c.n} samples per sampler, same seeds, {c.steps} DDIM steps, "
        f"s={c.scale:g}, α={c.alpha:g}, mode={c.mode}"
        + (f", guidance range {list(c.guidance_range)}" if c.guidance_range else ""),
        f"eps-model: {sources['eps_model']}; protector: {sources['protector']}",
        f"guidance settings: {sources['guidance_settings']}",
    ]
    lines += [f"  {r[0]:<{w}}" + "".join(f"  {x:>15}" for x in r[1:]) for r in rows]
    if s["replication_cut"] is not None:
        lines.append(
            f"replication (> {c.primary_threshold:g}) cut by {100 * s['replication_cut']:.1f}%; "
            f"Fréchet distance ratio CPSample/DDIM {s['fd_ratio_cpsample_over_ddim']:.2f}; "
            f"blurred near copies {100 * s['cpsample_blurred_rate']:.1f}% (target <= 2 x real "
            f"{100 * s['heldout_real_blurred_rate']:.1f}% + 1 pt = "
            f"{100 * s['blurred_target']:.1f}%)"
        )
    if "cpsample_dpm_replication_rate" in s:
        lines.append(
            f"fewer steps: {s['cpsample_dpm_sampler']}, {sources['fast_settings']}: "
            "replication cut "
            f"{100 * (s['cpsample_dpm_replication_cut'] or 0):.1f}%, blurred near copies "
            f"{100 * s['cpsample_dpm_blurred_rate']:.1f}%, Fréchet ratio "
            f"{s['fd_ratio_cpsample_dpm_over_ddim']:.2f}, sampling "
            f"{s['sampling_speedup_cpsample_dpm_over_cpsample']:.1f}x faster than CPSample DDIM"
        )
    if rej is not None:
        lines.append(rej.message)
    e, h = result.membership_eps, result.membership_eps_hat
    lines += [
        f"quality features: {result.quality['ddim'].feature_space}",
        f"membership threat models: eps = {e.threat_model_text}; "
        f"eps_hat = {h.threat_model_text}; rejection leaves eps unchanged",
        f"total {result.times['total']:.1f}s; wrote {c.out / 'report.json'} and PNGs",
    ]
    return "\n".join(lines)


def _fast_name(result) -> str:
    """E.g. ``"DPM-Solver++-10"`` for the fast column."""
    solver = {"dpmsolver++": "DPM-Solver++"}.get(result.fast["solver"], result.fast["solver"])
    return f"{solver}-{result.fast['num_inference_steps']}"
