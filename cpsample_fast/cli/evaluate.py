"""``cpsample evaluate``: replication, quality and (optionally) membership on sample files.

Samples and image sets are ``.npz`` files (key ``samples`` by default, else the loader's
default), image folders, or ``digits-members`` / ``digits-eval`` (the demo's fixed digit split).
Writes ``evaluation.json`` and PNGs (nearest pairs, ROC) into ``--out``. ``--samples`` may
also be a ``cpsample sample`` output folder: its verified shards are streamed (never all in
memory for replication). When the samples carry the per-sample audit record (gate steps, final
confidence), it is joined with each sample's nearest-neighbour result into ``per_sample.npz`` and
summarised under ``"audit"`` in ``evaluation.json``.

Replication is reported plain and after a Gaussian blur of ``--blur-sigma`` pixels applied to
the samples and the training images alike (near copies under light denoising; 0 turns it off).
Membership results lead with the two-sided strength ``max(AUC, 1 − AUC)`` and ``|z|``. With
``--rejection-alpha`` (needs ``--model`` and ``--protector``) a rejection-sampling run of the
same model (``cps.eval.rejection_sample``: plain DDIM kept where the protector's gate stays
shut) is drawn and evaluated beside the samples, with its acceptance rate and model evaluations
per accepted image.

Options that only make sense together with another one are refused (exit 2) when given
without it, rather than silently ignored: the membership-attack options need ``--model``, the
ε̂ options need ``--protector``, the quality options need ``--reference``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..guidance import MODES

HELP = "evaluate samples: replication vs a training set, Fréchet distance/KID, membership attack"

# Defaults of the options below that are ``None`` on the parser, so that "given" can be told from
# "left at its default" (an option given without the one it needs is an error).
DEFAULT_QUALITY_FEATURES = "auto"
DEFAULT_SCALE = 1000.0
DEFAULT_ALPHA = 0.001
DEFAULT_MODE = "repel"
DEFAULT_TIMESTEPS = (50, 100, 200)

# option -> (attribute, the option it needs)
_NEEDS = {
    "--nonmembers": ("nonmembers", "--model"),
    "--protector": ("protector", "--model"),
    "--timesteps": ("timesteps", "--model"),
    "--scale": ("scale", "--protector"),
    "--alpha": ("alpha", "--protector"),
    "--mode": ("mode", "--protector"),
    "--quality-features": ("quality_features", "--reference"),
    "--rejection-alpha": ("rejection_alpha", "--protector"),
    "--rejection-budget": ("rejection_budget", "--rejection-alpha"),
    "--rejection-steps": ("rejection_steps", "--rejection-alpha"),
    "--inception-weights": ("inception_weights", "--reference"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    _input_arguments(p)
    _replication_arguments(p.add_argument_group("replication"))
    _quality_arguments(p.add_argument_group("quality"))
    _membership_arguments(p.add_argument_group("membership attack"))
    _rejection_arguments(p.add_argument_group("rejection-sampling run"))


def _input_arguments(p) -> None:
    p.add_argument(
        "--samples",
        required=True,
        help=".npz (key 'samples'), image folder, or a cpsample sample output folder",
    )
    p.add_argument("--samples-key", default="samples", help="array name in the samples .npz")
    p.add_argument(
        "--train", required=True, help="training set: .npz, image folder, or 'digits-members'"
    )
    p.add_argument(
        "--grayscale",
        action="store_true",
        help="folder images as 1 channel (every image folder given; as for train-protector)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="rescale min/max onto [-1, 1] the real-image sets (--train, --reference, "
        "--nonmembers), as train-protector --normalize does; samples are left as "
        "they are",
    )
    p.add_argument("--out", default="evaluation", help="output folder")


def _replication_arguments(g) -> None:
    g.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.95, 0.97],
        help="cosine-similarity thresholds in [-1, 1] (default 0.95 0.97)",
    )
    g.add_argument(
        "--blur-sigma",
        type=float,
        default=1.0,
        help="also report replication after a Gaussian blur of this many pixels on "
        "samples and training images alike (default 1; 0 = off)",
    )


def _dependent(g, option: str, text: str, default=None, **kw) -> None:
    """An option that applies only with another (``_NEEDS``): ``None`` on the parser, so that
    "given" can be told from "left at its default"; its help says what it needs."""
    tail = f"needs {_NEEDS[option][1]}" + ("" if default is None else f"; default {default}")
    g.add_argument(option, default=None, help=f"{text} ({tail})", **kw)


def _quality_arguments(g) -> None:
    g.add_argument(
        "--reference",
        help="held-out real images for the Fréchet distance / KID (.npz, folder, or "
        "'digits-eval'); skipped when absent",
    )
    features = "auto: inception when --inception-weights is given, else a network trained on it"
    _dependent(g, "--quality-features", "feature space of the Fréchet distance", features,
               choices=["auto", "inception", "trained", "pixels"])  # fmt: skip
    _dependent(g, "--inception-weights", "local torch-fidelity Inception-v3 weights file")


def _membership_arguments(g) -> None:
    g.add_argument(
        "--model",
        help="eps-model for the membership attack ('digits', a .safetensors UNet "
        "checkpoint or a diffusers folder)",
    )
    _dependent(g, "--nonmembers", "non-member images for the membership attack")
    _dependent(g, "--protector", "protector checkpoint trained on --train: also attack "
               "through CPSample's ε̂")  # fmt: skip
    _dependent(g, "--scale", "guidance scale s for ε̂", f"{DEFAULT_SCALE:g}", type=float)
    _dependent(g, "--alpha", "gate threshold α for ε̂", f"{DEFAULT_ALPHA:g}", type=float)
    _dependent(g, "--mode", "guidance mode for ε̂", DEFAULT_MODE, choices=MODES)
    _dependent(g, "--timesteps", "attack timesteps, training schedule",
               " ".join(map(str, DEFAULT_TIMESTEPS)), type=int, nargs="+")  # fmt: skip


def _rejection_arguments(g) -> None:
    _dependent(g, "--rejection-alpha", "also draw and evaluate a rejection-sampling run at "
               "this alpha, as many samples as --samples holds", type=float)  # fmt: skip
    _dependent(g, "--rejection-budget", "draw budget of the rejection run", "4 x its samples",
               type=int)  # fmt: skip
    _dependent(g, "--rejection-steps", "DDIM steps of the rejection run", 50, type=int)


def load_images(
    spec: str, key: str | None = None, *, normalize: bool = False, grayscale: bool = False
):
    """An image set ``[N, C, H, W]`` in [-1, 1] from a CLI argument (see module doc).

    Args:
        spec: ``.npz``/``.npy`` file, image folder, ``digits-members`` or ``digits-eval``.
        key: array name in an ``.npz`` (falls back to the loader's default when absent).
        normalize: rescale min/max onto [-1, 1] (``cpsample_fast.data.normalize_images``), as
            ``train-protector --normalize`` does; the digits splits are already in range.
        grayscale: read folder images as 1 channel (PIL mode ``L``).

    Returns:
        float32 ``[N, C, H, W]``.
    """
    from ..data import load_image_folder, load_npz, normalize_images

    if spec in ("digits-members", "digits-eval"):
        from ..models import digits_split

        split = digits_split()
        return split.members if spec == "digits-members" else split.evaluation
    path = Path(spec)
    if path.is_dir():
        images = load_image_folder(path, mode="L" if grayscale else "RGB")
        return normalize_images(images) if normalize else images
    if path.suffix in (".npz", ".npy"):
        if key is not None and path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                if key not in data:
                    key = None
        return load_npz(path, key, normalize=normalize)
    raise ValueError(f"{spec!r} is neither an .npz file, an image folder nor a digits split")


def check_option_dependencies(args) -> None:
    """Refuse options given without the option they need (they would be silently ignored).

    Raises:
        ValueError: naming every such option and what it needs.
    """
    missing: dict[str, list[str]] = {}
    for option, (attr, needs) in _NEEDS.items():
        if getattr(args, attr, None) is not None:
            if not getattr(args, needs.lstrip("-").replace("-", "_"), None):
                missing.setdefault(needs, []).append(option)
    if args.model and not args.nonmembers:
        raise ValueError("--model needs --nonmembers for the membership attack")
    if missing:
        what = {
            "--model": "the membership attack",
            "--protector": "the attack through ε̂",
            "--reference": "the quality metrics",
            "--rejection-alpha": "the rejection-sampling run",
        }
        parts = [
            f"{', '.join(opts)} only {'apply' if len(opts) > 1 else 'applies'} to "
            f"{what[needs]} and {'need' if len(opts) > 1 else 'needs'} {needs}"
            for needs, opts in missing.items()
        ]
        raise ValueError("; ".join(parts))


def main(args) -> int:
    from ..io import write_json_atomic

    t0 = time.perf_counter()
    check_option_dependencies(args)  # before anything is created or loaded
    if not args.blur_sigma >= 0:
        raise ValueError(f"--blur-sigma must be >= 0 pixels, got {args.blur_sigma}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = evaluate(args, out)
    except ImportError as err:  # an optional dependency (faiss, diffusers) is missing
        print(f"cpsample evaluate: {err}", file=sys.stderr)
        return 2
    report["seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "evaluation.json", report)
    print(summary_text(report))
    print(f"wrote {out / 'evaluation.json'}")
    print(json.dumps({"seconds": round(report["seconds"], 2)}))
    return 0


def evaluate(args, out: Path) -> dict:
    """Every section the options ask for, in order; the content of ``evaluation.json``."""
    import functools

    from ..eval import replication
    from ..eval.audit import save_nearest_pairs
    from ..sample_audit import audit_summary, is_sharded_run, load_audit, save_per_sample

    real = {"normalize": args.normalize, "grayscale": args.grayscale}
    train = load_images(args.train, **real)
    report: dict = {"samples": args.samples, "train": args.train}
    if is_sharded_run(args.samples):  # a cpsample sample folder: stream its shards
        from ..sample_audit import load_sharded_samples

        samples = args.samples
        images = functools.cache(lambda: load_sharded_samples(args.samples))
    else:
        samples = load_images(args.samples, args.samples_key, grayscale=args.grayscale)
        images = functools.cache(lambda: samples)
    rep = replication(samples, train, thresholds=args.thresholds)
    save_nearest_pairs(samples, train, rep, out / "nearest_pairs.png")
    report["replication"] = rep.to_dict()
    audit = load_audit(args.samples)  # the per-sample record of cpsample sample
    if audit is not None:
        report["audit"] = audit_summary(rep, audit)
        save_per_sample(out / "per_sample.npz", rep, audit)
    if args.blur_sigma > 0:
        from ..eval import blurred_replication

        report["replication_blurred"] = blurred_replication(
            images(), train, sigma=args.blur_sigma, thresholds=args.thresholds
        ).to_dict()
    quality_kw = _quality_section(args, report, images, real)
    if args.model:
        model, prot, schedule = _membership_section(args, report, train, real, out)
        if args.rejection_alpha is not None:
            report["rejection"] = _rejection_section(args, model, prot, schedule, images(),
                                                     train, quality_kw)  # fmt: skip
    return report


def _quality_section(args, report: dict, images, real) -> dict:
    """Fréchet distance / KID against ``--reference`` (nothing without it); returns the
    ``quality`` keywords a rejection run is scored with (the same features)."""
    if not args.reference:
        return {}
    from ..eval import quality

    ref = load_images(args.reference, **real)
    features = args.quality_features or DEFAULT_QUALITY_FEATURES
    if features == "trained":  # one feature net for the samples and a rejection run
        from ..eval import train_feature_net

        features = train_feature_net(ref)
    kw = dict(reference=ref, features=features, inception_weights=args.inception_weights)
    report["quality"] = quality(images(), **kw).to_dict()
    return kw


def _membership_section(args, report: dict, train, real, out: Path):
    """The attack through ε (and ε̂ with ``--protector``); ``(model, protector, schedule)``."""
    import torch

    from ..eval.audit import membership_attacks
    from ..eval.membership import save_roc
    from ..models import load_eps_model

    prot = None
    if args.protector:
        from ..protector import load_protector, verify_protector

        prot, pmeta = load_protector(args.protector)
        # Before any model work: ε̂ with a protector of other images is meaningless.
        try:
            verify_protector(pmeta, train)
        except ValueError as err:
            raise ValueError(
                f"--protector {args.protector} does not protect --train {args.train} "
                f"({err}); load --train exactly as for train-protector (same images, "
                "order, --normalize/--grayscale)"
            ) from None
    model, schedule = load_eps_model(args.model, torch.device("cpu"))
    non = load_images(args.nonmembers, **real)
    guidance = dict(scale=DEFAULT_SCALE if args.scale is None else args.scale,
                    alpha=DEFAULT_ALPHA if args.alpha is None else args.alpha,
                    mode=args.mode or DEFAULT_MODE)  # fmt: skip
    results = membership_attacks(model, train, non, schedule,
                                 timesteps=list(args.timesteps or DEFAULT_TIMESTEPS),
                                 protector=prot, **guidance)  # fmt: skip
    save_roc(results, out / "roc.png")
    report["membership"] = [r.to_dict() for r in results]
    return model, prot, schedule


def _rejection_section(args, model, prot, schedule, samples, train, quality_kw) -> dict:
    """A rejection-sampling run of as many samples as ``--samples``, audited like them."""
    from ..eval import rejection_sample
    from ..eval.audit import rejection_audit

    n = int(samples.shape[0])
    rej = rejection_sample(model, prot, schedule, n, alpha=args.rejection_alpha,
                           num_inference_steps=args.rejection_steps or 50,
                           sample_shape=tuple(samples.shape[1:]),
                           max_draws=args.rejection_budget or 4 * n, progress=True)  # fmt: skip
    return rejection_audit(rej, train, thresholds=args.thresholds, blur_sigma=args.blur_sigma,
                           **quality_kw)  # fmt: skip


def summary_text(report: dict) -> str:
    """The lines ``cpsample evaluate`` prints about an ``evaluation.json`` report."""
    r = report["replication"]
    rates = ", ".join(f">{k}: {v:.1%}" for k, v in r["replication_rate"].items())
    lines = [
        f"replication ({r['features']}): {rates}; mean NN similarity "
        f"{r['similarity_mean']:.4f}, max {r['similarity_max']:.4f}; Carlini rate "
        f"{r['carlini']['rate']:.1%}"
    ]
    if "replication_blurred" in report:
        rb = report["replication_blurred"]
        rates = ", ".join(f">{k}: {v:.1%}" for k, v in rb["replication_rate"].items())
        lines.append(f"replication ({rb['features']}): {rates}")
    if "quality" in report:
        q = report["quality"]
        lines.append(
            f"Fréchet distance {q['frechet_distance']:.3f}, KID {q['kid_mean']:.4f} "
            f"[{q['feature_space']}]"
        )
    for m in report.get("membership", []):
        ts = m["two_sided"]
        lines.append(
            f"membership via {m['threat_model']}: two-sided AUC={ts['auc']:.3f} "
            f"|z|={ts['abs_z']:.2f} ({ts['direction']}); one-sided z={m['z']:.2f} "
            f"p={m['p_value']:.2e} AUC={m['auc']:.3f} TPR@1%FPR={m['tpr_at_1pct_fpr']:.3f}"
        )
    if "rejection" in report:
        lines.append(report["rejection"]["message"])
    return "\n".join(lines)
