"""``cpsample demo``: CPSample against plain DDIM on a memorising digits model, in one table.

sklearn digits, a fixed member subset (``models.digits_split``) and held-out non-members. The
shipped memorising UNet and protector (``cpsample_fast/assets``) are loaded, or trained with
``--train`` (slow: ~25 min for the UNet on one CPU thread). The same seeds are sampled with plain
DDIM and with CPSample, then: replication rate at the thresholds, mean / max nearest-neighbour
similarity, Fréchet distance to held-out digits, membership z / p / AUC through ε and ε̂, time.
Writes ``report.json`` and PNGs into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "CPSample vs plain DDIM on a memorising digits model: replication, quality, membership"

# Chosen by a search on the shipped models (scripts/tune_demo_guidance.py; 50 DDIM steps, η = 0;
# replication > 0.98 cut vs plain DDIM's 100%; Fréchet ratio CPSample / DDIM at the same seed;
# 128 samples, seeds 0 / 1, where DDIM's Fréchet distance is 18.4 / 14.5):
#   repel α=0.3 s=250 (old default): cut 98.4 / 94.5%, ratio 1.26 / 1.37
#   entropy α=0.3: s=200 90.6 / 88.3%, 1.07 / 1.14;  s=215 93.0 / 91.4%, 1.11 / 1.15
#                  s=225 95.3 / 93.0%, 1.13 / 1.18;  s=240 96.1 / 93.8%, 1.19 / 1.21
#                  s=250 97.7 / 92.2%, 1.20 / 1.25
#   entropy α=0.35 s=200 83.6 / 82.0%;  α=0.4 s=200 75.8 / 72.7%;  α=0.25 s=250 1.25 / 1.33
#   repel α=0.4 s=200 94.5 / 90.6%, 1.09 / 1.39;  repel α=0.5 s=150 cut 20 / 26%, ratio 2.3 / 2.9
#   guidance_range (repel α=0.3 s=250): t ∈ [0, 700] or [20, 999] identical (the gate never
#     opens above t = 700); [50, 600] 1.27 / 1.38, [100, 600] 1.28 / 1.39, [0, 400] 1.27 / 1.40
#   steps (repel α=0.3 s=250): 25 → 97.7 / 96.9%, 1.30 / 1.48;  100 → 96.1 / 95.3%, 1.25 / 1.33
#   η > 0 lowers plain DDIM's own distance and lets samples drift back to members: repel α=0.3
#     s=250 η=0.5 cut 86.7 / 78.9%, η=1 21 / 23%; s=500 η=0.5 93.8 / 93.0% at ratio 1.47 / 1.15
# entropy at α = 0.3, s = 225 meets cut ≥ 90% and ratio ≤ 1.2 on seeds 0 and 1. Held-out seeds
# 2 / 3 (not used to choose; DDIM distance 13.1 / 16.2): cut 94.5 / 92.2%, ratio 1.40 / 1.22,
# against 96.9 / 93.8% and 1.67 / 1.37 for the old default — the ratio of two 128-sample Fréchet
# distances moves by ~±0.15 between seeds, so 1.2 is met on the search seeds, not guaranteed.
# Pooled over seeds 0–3 (512 samples each): cut 93.8%, ratio 1.22 (old default: 95.9%, 1.42).
DEFAULT_SCALE = 225.0
DEFAULT_ALPHA = 0.3
DEFAULT_MODE = "entropy"
# Pixel-space cosine threshold for "replica", calibrated on real digits the model never saw: of
# the 512 evaluation digits, 1 (0.2%) has a nearest-member similarity above 0.98 (max 0.9805,
# 99th percentile 0.971), so > 0.98 is closer to a member than natural variation gets. The paper's
# 0.95 and 0.97 are shown too, but 13.9% and 1.8% of real held-out digits already exceed them
# (8×8 digits upsampled to 16×16 are smooth and alike in pixel space). The demo prints this
# calibration column next to the samplers.
DEFAULT_THRESHOLDS = (0.95, 0.97, 0.98)
PRIMARY_THRESHOLD = 0.98
PROTECTOR_ASSET = "digits_protector.safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--n", type=int, default=128, help="samples per sampler (default 128)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed shared by both samplers")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="guidance scale s")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="gate threshold α")
    p.add_argument("--mode", default=DEFAULT_MODE, choices=["repel", "attract", "entropy"])
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    p.add_argument(
        "--n-nonmembers",
        type=int,
        default=64,
        help="held-out digits used as non-members in the membership attack",
    )
    p.add_argument("--attack-timesteps", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument(
        "--train",
        action="store_true",
        help="train the eps-model and protector here instead of loading the shipped "
        "weights (UNet ~25 min, protector ~2 min on one CPU thread)",
    )
    p.add_argument("--unet-steps", type=int, default=8000, help="UNet steps with --train")
    p.add_argument("--protector-steps", type=int, default=1500, help="protector steps with --train")
    p.add_argument(
        "--feature-steps",
        type=int,
        default=200,
        help="training steps of the Fréchet feature network (default 200)",
    )
    p.add_argument("--backend", default="auto", help="CPSampler backend")


def _assets() -> Path:
    from ..models.digits import ASSET_DIR

    return ASSET_DIR


def load_or_train_models(args, split, schedule, log):
    """``(eps_model, protector, protector_meta, sources)`` — shipped weights or trained here."""
    from ..models import SmallUNet, load_digits_unet, train_diffusion
    from ..protector import ProtectorNet, load_protector, train_protector, verify_protector

    sources = {}
    unet_path = _assets() / "digits_unet.safetensors"
    if not args.train and unet_path.exists():
        eps_model, meta = load_digits_unet(unet_path)
        sources["eps_model"] = f"shipped {unet_path.name} ({meta.get('steps')} steps)"
        if meta.get("member_index") != split.member_index.tolist():
            raise ValueError("the shipped UNet was trained on another member split")
    else:
        log("training the memorising UNet (slow; shipped weights make this unnecessary)")
        eps_model, _ = train_diffusion(
            SmallUNet("digits"),
            split.members,
            schedule,
            steps=args.unet_steps,
            batch_size=32,
            lr=1e-3,
            seed=0,
        )
        eps_model.requires_grad_(False)
        sources["eps_model"] = f"trained here ({args.unet_steps} steps)"
    prot_path = _assets() / PROTECTOR_ASSET
    if not args.train and prot_path.exists():
        protector, pmeta = load_protector(prot_path)
        verify_protector(pmeta, split.members)  # raises if it protects other images
        sources["protector"] = f"shipped {prot_path.name}"
    else:
        log("training the protector")
        protector, report = train_protector(
            split.members,
            schedule=schedule,
            protector=ProtectorNet(1, 16, base_channels=16),
            holdout=split.holdout,
            steps=args.protector_steps,
            batch_size=64,
            lr=2e-3,
            seed=0,
        )
        pmeta = {"report": report.to_dict(), "fingerprint": report.fingerprint}
        sources["protector"] = f"trained here ({args.protector_steps} steps)"
    protector.requires_grad_(False)
    return eps_model, protector, pmeta, sources


def _fmt_rate(r: float) -> str:
    return f"{100 * r:5.1f}%"


def main(args) -> int:
    import numpy as np

    from ..eval import membership_inference, quality, replication, train_feature_net
    from ..eval.membership import save_roc
    from ..eval.plots import save_image_grids, save_lines_png
    from ..eval.replication import check_threshold, save_pairs_grid
    from ..io import atomic_path, write_json_atomic
    from ..models import digits_split
    from ..protector import ProtectorReport
    from ..sampler import CPSampler
    from ..schedule import NoiseSchedule

    def log(msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)

    try:
        thresholds = [check_threshold(t) for t in args.thresholds]
        if args.n < 2 or args.n_nonmembers < 2:
            raise ValueError("--n and --n-nonmembers must be >= 2")
    except ValueError as err:
        print(f"cpsample demo: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    split = digits_split()
    schedule = NoiseSchedule()
    eps_model, protector, pmeta, sources = load_or_train_models(args, split, schedule, log)
    times["load_models"] = time.perf_counter() - t0

    shape = (args.n, 1, 16, 16)
    samples, traces = {}, {}
    for name, scale in (("ddim", 0.0), ("cpsample", args.scale)):
        t0 = time.perf_counter()
        sampler = CPSampler(
            eps_model,
            protector if scale else None,
            schedule,
            num_inference_steps=args.steps,
            scale=scale,
            alpha=args.alpha,
            mode=args.mode,
            backend=args.backend,
        )
        if scale:
            samples[name], traces[name] = sampler.sample(shape, seed=args.seed, return_trace=True)
        else:
            samples[name] = sampler.sample(shape, seed=args.seed)
        times[f"sample_{name}"] = time.perf_counter() - t0
        log(f"sampled {args.n} with {name} in {times[f'sample_{name}']:.1f}s")

    t0 = time.perf_counter()
    reps = {k: replication(x, split.members, thresholds=thresholds) for k, x in samples.items()}
    # Calibration: real digits the model never saw, against the same members.
    calib = replication(split.evaluation, split.members, thresholds=thresholds)
    times["replication"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    feature_net = train_feature_net(split.evaluation, steps=args.feature_steps, seed=0)
    quals = {
        k: quality(x, split.evaluation, features=feature_net, kid_subsets=20)
        for k, x in samples.items()
    }
    times["quality"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    non = split.evaluation[: args.n_nonmembers]
    mi_eps = membership_inference(
        eps_model, split.members, non, schedule, timesteps=args.attack_timesteps
    )
    mi_hat = membership_inference(
        eps_model,
        split.members,
        non,
        schedule,
        timesteps=args.attack_timesteps,
        protector=protector,
        scale=args.scale,
        alpha=args.alpha,
        mode=args.mode,
    )
    times["membership"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    save_image_grids(
        {
            "plain DDIM": samples["ddim"],
            f"CPSample (s={args.scale:g}, α={args.alpha:g}, {args.mode})": samples["cpsample"],
        },
        out / "samples.png",
    )
    for k, x in samples.items():
        save_pairs_grid(x, split.members, reps[k], out / f"nearest_pairs_{k}.png", n=12)
    save_roc([mi_eps, mi_hat], out / "membership_roc.png")
    tr = traces["cpsample"]
    steps_t = tr.timesteps.cpu().numpy()
    series = {
        "mean confidence q": (steps_t, tr.confidence.nanmean(1).cpu().numpy()),
        "gate open (fraction)": (steps_t, tr.gate_fraction().cpu().numpy()),
    }
    for b in range(min(4, args.n)):
        series[f"sample {b} q"] = (steps_t, tr.confidence[:, b].cpu().numpy())
    save_lines_png(
        series,
        out / "confidence_trace.png",
        xlabel="timestep t (sampling runs right to left)",
        ylabel="protector confidence / gate",
        invert_x=True,
        hlines=[1 - args.alpha],
        title="CPSample: per-step protector confidence",
    )
    ProtectorReport.from_dict(pmeta["report"]).plot(out / "protector_accuracy.png")
    times["plots"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_all

    d_rep = {k: r.to_dict() for k, r in reps.items()}
    base = reps["ddim"].rate(PRIMARY_THRESHOLD) if PRIMARY_THRESHOLD in thresholds else None
    cut = None
    if base:
        cut = 1 - reps["cpsample"].rate(PRIMARY_THRESHOLD) / base
    fd_ratio = quals["cpsample"].frechet_distance / max(quals["ddim"].frechet_distance, 1e-12)
    report = {
        "setting": {
            "data": "sklearn digits 16x16, [-1, 1]",
            "members": int(split.members.shape[0]),
            "evaluation_nonmembers": int(split.evaluation.shape[0]),
            "n_samples": args.n,
            "num_inference_steps": args.steps,
            "seed": args.seed,
            "scale": args.scale,
            "alpha": args.alpha,
            "mode": args.mode,
            "thresholds": thresholds,
            "primary_threshold": PRIMARY_THRESHOLD,
            "sources": sources,
        },
        "replication": d_rep,
        "replication_heldout_real_digits": calib.to_dict(),
        "quality": {k: q.to_dict() for k, q in quals.items()},
        "membership": {"eps": mi_eps.to_dict(), "eps_hat": mi_hat.to_dict()},
        "summary": {
            "ddim_replication_rate": base,
            "cpsample_replication_rate": reps["cpsample"].rate(PRIMARY_THRESHOLD),
            "replication_cut": cut,
            "fd_ratio_cpsample_over_ddim": fd_ratio,
            "gate_open_fraction": float(tr.gate.float().mean()),
        },
        "seconds": times,
    }
    write_json_atomic(out / "report.json", report)
    for k, x in samples.items():  # for `cpsample evaluate --samples samples_<k>.npz`
        with atomic_path(out / f"samples_{k}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, samples=x.cpu().numpy())

    rows = [("", "plain DDIM", "CPSample", "real held-out")]
    for t in thresholds:
        rows.append(
            (
                f"replication > {t:g}",
                _fmt_rate(reps["ddim"].rates[t]),
                _fmt_rate(reps["cpsample"].rates[t]),
                _fmt_rate(calib.rates[t]),
            )
        )
    rows.append(
        (
            "Carlini l2 extraction",
            _fmt_rate(reps["ddim"].carlini_rate),
            _fmt_rate(reps["cpsample"].carlini_rate),
            _fmt_rate(calib.carlini_rate),
        )
    )
    for key, label in (
        ("similarity_mean", "NN similarity mean"),
        ("similarity_max", "NN similarity max"),
    ):
        rows.append(
            (
                label,
                f"{d_rep['ddim'][key]:.4f}",
                f"{d_rep['cpsample'][key]:.4f}",
                f"{report['replication_heldout_real_digits'][key]:.4f}",
            )
        )
    rows.append(
        (
            "Frechet dist. to held-out",
            f"{quals['ddim'].frechet_distance:.2f}",
            f"{quals['cpsample'].frechet_distance:.2f}",
        )
    )
    rows.append(
        (
            "KID x100",
            f"{100 * quals['ddim'].kid_mean:.2f}",
            f"{100 * quals['cpsample'].kid_mean:.2f}",
        )
    )
    rows.append(("membership via eps / eps_hat: z", f"{mi_eps.z:.2f}", f"{mi_hat.z:.2f}"))
    rows.append(("  p-value", f"{mi_eps.p_value:.2e}", f"{mi_hat.p_value:.2e}"))
    rows.append(("  ROC AUC", f"{mi_eps.auc:.3f}", f"{mi_hat.auc:.3f}"))
    rows.append(
        ("  TPR @ 1% FPR", f"{mi_eps.tpr_at_1pct_fpr:.3f}", f"{mi_hat.tpr_at_1pct_fpr:.3f}")
    )
    rows.append(
        ("sampling time (s)", f"{times['sample_ddim']:.1f}", f"{times['sample_cpsample']:.1f}")
    )
    w = max(len(r[0]) for r in rows)
    print(
        f"CPSample demo: {args.n} samples per sampler, same seeds, {args.steps} DDIM steps, "
        f"s={args.scale:g}, α={args.alpha:g}, mode={args.mode}"
    )
    print(f"eps-model: {sources['eps_model']}; protector: {sources['protector']}")
    for r in rows:
        extra = f"  {r[3]:>13}" if len(r) > 3 else ""
        print(f"  {r[0]:<{w}}  {r[1]:>12}  {r[2]:>12}{extra}")
    if cut is not None:
        print(
            f"replication (> {PRIMARY_THRESHOLD:g}) cut by {100 * cut:.1f}%; Fréchet distance "
            f"ratio CPSample/DDIM {fd_ratio:.2f}"
        )
    print(f"quality features: {quals['ddim'].feature_space}")
    print(
        f"membership threat models: eps = {mi_eps.threat_model_text}; "
        f"eps_hat = {mi_hat.threat_model_text}"
    )
    print(f"total {times['total']:.1f}s; wrote {out / 'report.json'} and PNGs")
    return 0
