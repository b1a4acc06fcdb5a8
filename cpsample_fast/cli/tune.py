"""``cpsample tune``: search guidance settings for the user's targets (``cps.tune_guidance``).

Writes into ``--out``: ``tune.json`` and ``tune.csv`` (every scored setting, the Pareto front,
the recommendation, its held-out re-score and the rejection baseline), ``pareto.png``,
``cost.png`` and ``settings.json``, which ``cpsample sample --settings`` and
``CPSampler.from_settings`` read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "search mode/alpha/scale/guidance range for replication, quality and membership targets"


def _range(text: str):
    if text in ("all", "none", "None"):
        return None
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"guidance range must be 'all' or LO-HI, got {text!r}"
        ) from None


def _sampler(text: str):
    solver, _, steps = text.rpartition(":")
    try:
        return solver, int(steps)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a sampler must be SOLVER:STEPS (e.g. dpmsolver++:8), got {text!r}"
        ) from None


# Options passed to ``tune_guidance`` unchanged: their ``dest`` is the parameter's name.
SEARCH_OPTIONS = (
    "budget", "modes", "alphas", "scales", "guidance_ranges", "samplers", "num_inference_steps",
    "eta", "seeds", "holdout_seeds", "holdout_samples", "rounds", "threshold", "blur_sigma",
    "n_nonmembers", "rejection_budget", "backend",
)  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..tune import Targets

    t = Targets()
    p.add_argument(
        "--model", required=True, help="eps-model ('digits', .safetensors, diffusers dir)"
    )
    p.add_argument(
        "--protector", required=True, help="protector checkpoint (.safetensors or folder)"
    )
    p.add_argument(
        "--members",
        required=True,
        help="the protector's training images (.npz, folder or 'digits-members')",
    )
    p.add_argument(
        "--reference",
        required=True,
        help="real held-out images (.npz, folder or 'digits-eval'): Fréchet reference, blurred "
        "calibration, membership non-members",
    )
    p.add_argument("--normalize", action="store_true", help="rescale real images onto [-1, 1]")
    p.add_argument("--grayscale", action="store_true", help="folder images as 1 channel")
    p.add_argument("--budget", type=int, default=3000, help="samples the search may draw")
    p.add_argument("--target-cut", type=float, default=t.replication_cut)
    p.add_argument("--target-blurred-factor", type=float, default=t.blurred_factor)
    p.add_argument("--target-blurred-margin", type=float, default=t.blurred_margin)
    p.add_argument("--target-frechet", type=float, default=t.frechet_ratio)
    p.add_argument("--target-auc", type=float, default=t.membership_auc, help="two-sided AUC")
    p.add_argument("--modes", nargs="+", default=["repel", "entropy"])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.4, 0.45, 0.5])
    p.add_argument("--scales", type=float, nargs="+", default=[300.0, 1000.0, 3000.0, 8000.0])
    p.add_argument("--ranges", type=_range, nargs="+", default=[None], help="'all' or LO-HI",
                   dest="guidance_ranges")  # fmt: skip
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (the baseline; default 50)",
                   dest="num_inference_steps")  # fmt: skip
    p.add_argument(
        "--samplers",
        type=_sampler,
        nargs="+",
        default=None,
        metavar="SOLVER:STEPS",
        help="samplers searched too, e.g. ddim:50 dpmsolver++:8 (default: ddim:--steps)",
    )
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--holdout-seeds", type=int, nargs="+", default=[2, 3])
    p.add_argument("--holdout-samples", type=int, default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.98)
    p.add_argument("--blur-sigma", type=float, default=1.0, help="blur, pixels (default 1)")
    p.add_argument("--n-nonmembers", type=int, default=64)
    p.add_argument("--rejection-budget", type=int, default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default="tune_out")


def main(args) -> int:
    import torch

    from ..models import load_eps_model
    from ..protector import load_protector
    from ..tune import Targets, tune_guidance
    from .evaluate import load_images

    targets = Targets(
        replication_cut=args.target_cut,
        blurred_factor=args.target_blurred_factor,
        blurred_margin=args.target_blurred_margin,
        frechet_ratio=args.target_frechet,
        membership_auc=args.target_auc,
    ).check()
    real = {"normalize": args.normalize, "grayscale": args.grayscale}
    members = load_images(args.members, **real)
    reference = load_images(args.reference, **real)
    model, schedule = load_eps_model(args.model, torch.device("cpu"))
    protector, meta = load_protector(args.protector)
    protector.requires_grad_(False)
    search = {name: getattr(args, name) for name in SEARCH_OPTIONS}
    result = tune_guidance(model, protector, schedule, members, reference, targets=targets,
                           protector_meta=meta, **search)  # fmt: skip
    paths = result.write(Path(args.out))
    print(result.summary())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
