"""``cpsample evaluate``: replication, quality and (optionally) membership on sample files.

Samples and image sets are ``.npz`` files (key ``samples`` by default, else the loader's
default), image folders, or ``digits-members`` / ``digits-eval`` (the demo's fixed digit split).
Writes ``evaluation.json`` and PNGs (nearest pairs, ROC) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HELP = "evaluate samples: replication vs a training set, Fréchet distance/KID, membership attack"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", required=True, help=".npz (key 'samples') or image folder")
    p.add_argument("--samples-key", default="samples", help="array name in the samples .npz")
    p.add_argument(
        "--train", required=True, help="training set: .npz, image folder, or 'digits-members'"
    )
    p.add_argument(
        "--reference",
        help="held-out real images for the Fréchet distance / KID "
        "(.npz, folder, or 'digits-eval'); skipped when absent",
    )
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.95, 0.97],
        help="cosine-similarity thresholds in [-1, 1] (default 0.95 0.97)",
    )
    p.add_argument(
        "--quality-features",
        default="auto",
        choices=["auto", "inception", "trained", "pixels"],
        help="feature space of the Fréchet distance (auto: inception when "
        "--inception-weights is given, else a network trained on --reference)",
    )
    p.add_argument("--inception-weights", help="local torch-fidelity Inception-v3 weights file")
    p.add_argument(
        "--model",
        help="eps-model for the membership attack ('digits', a "
        ".safetensors UNet checkpoint or a diffusers folder)",
    )
    p.add_argument("--nonmembers", help="non-member images for the membership attack")
    p.add_argument("--protector", help="protector checkpoint: also attack through CPSample's ε̂")
    p.add_argument("--scale", type=float, default=1000.0, help="guidance scale s for ε̂")
    p.add_argument("--alpha", type=float, default=0.001, help="gate threshold α for ε̂")
    p.add_argument("--mode", default="repel", choices=["repel", "attract", "entropy"])
    p.add_argument(
        "--timesteps",
        type=int,
        nargs="+",
        default=[50, 100, 200],
        help="attack timesteps (training schedule)",
    )
    p.add_argument("--out", default="evaluation", help="output folder")


def load_images(spec: str, key: str | None = None):
    """An image set ``[N, C, H, W]`` in [-1, 1] from a CLI argument (see module doc)."""
    from ..data import load_image_folder, load_npz

    if spec in ("digits-members", "digits-eval"):
        from ..models import digits_split

        split = digits_split()
        return split.members if spec == "digits-members" else split.evaluation
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix in (".npz", ".npy"):
        if key is not None and path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                if key not in data:
                    key = None
        return load_npz(path, key)
    raise ValueError(f"{spec!r} is neither an .npz file, an image folder nor a digits split")


def main(args) -> int:
    import torch

    from ..eval import membership_inference, quality, replication, save_pairs_grid
    from ..eval.membership import save_roc
    from ..io import write_json_atomic

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        samples = load_images(args.samples, args.samples_key)
        train = load_images(args.train)
        report: dict = {"samples": args.samples, "train": args.train}
        rep = replication(samples, train, thresholds=args.thresholds)
        save_pairs_grid(samples, train, rep, out / "nearest_pairs.png")
        report["replication"] = rep.to_dict()
        if args.reference:
            ref = load_images(args.reference)
            q = quality(
                samples,
                ref,
                features=args.quality_features,
                inception_weights=args.inception_weights,
            )
            report["quality"] = q.to_dict()
        if args.model:
            if not args.nonmembers:
                raise ValueError("--model needs --nonmembers for the membership attack")
            from .sample import load_eps_model

            model, schedule = load_eps_model(args.model, torch.device("cpu"))
            non = load_images(args.nonmembers)
            results = [membership_inference(model, train, non, schedule, timesteps=args.timesteps)]
            if args.protector:
                from ..protector import load_protector

                prot, _ = load_protector(args.protector)
                results.append(
                    membership_inference(
                        model,
                        train,
                        non,
                        schedule,
                        timesteps=args.timesteps,
                        protector=prot,
                        scale=args.scale,
                        alpha=args.alpha,
                        mode=args.mode,
                    )
                )
            save_roc(results, out / "roc.png")
            report["membership"] = [r.to_dict() for r in results]
    except (ValueError, FileNotFoundError, TypeError, ImportError) as err:
        print(f"cpsample evaluate: {err}", file=sys.stderr)
        return 2
    report["seconds"] = time.perf_counter() - t0
    write_json_atomic(out / "evaluation.json", report)
    r = report["replication"]
    rates = ", ".join(f">{k}: {v:.1%}" for k, v in r["replication_rate"].items())
    print(
        f"replication ({r['features']}): {rates}; mean NN similarity "
        f"{r['similarity_mean']:.4f}, max {r['similarity_max']:.4f}; Carlini rate "
        f"{r['carlini']['rate']:.1%}"
    )
    if "quality" in report:
        q = report["quality"]
        print(
            f"Fréchet distance {q['frechet_distance']:.3f}, KID {q['kid_mean']:.4f} "
            f"[{q['feature_space']}]"
        )
    for m in report.get("membership", []):
        print(
            f"membership via {m['threat_model']}: z={m['z']:.2f} p={m['p_value']:.2e} "
            f"AUC={m['auc']:.3f} TPR@1%FPR={m['tpr_at_1pct_fpr']:.3f}"
        )
    print(f"wrote {out / 'evaluation.json'}")
    print(json.dumps({"seconds": round(report["seconds"], 2)}))
    return 0
