"""Scoring one sample set: replication (plain and blurred), Fréchet/KID, and the result row.

Every candidate's samples are scored against the members (replication, docs/ALGORITHM.md §6)
and the reference images (Fréchet distance and KID in the feature space of one ``FeatureNet``
trained on the reference); the row relates them to plain DDIM's at the same seeds.
"""

from __future__ import annotations

import torch

SCORE_KEYS = (
    "replication_rate", "replication_cut", "blurred_rate", "blurred_limit", "frechet",
    "frechet_ratio", "kid", "membership_auc", "membership_abs_z", "model_evaluations_per_image",
)  # fmt: skip


class Scorer:
    """Everything one evaluation of a sample set needs, built once."""

    def __init__(self, members, reference, *, threshold, blur_sigma, feature_steps, seed):
        from ..eval import blurred_replication, replication, train_feature_net

        self.members, self.reference = members, reference
        self.threshold, self.blur_sigma = threshold, blur_sigma
        self.features = train_feature_net(reference, steps=feature_steps, seed=seed)
        calib = blurred_replication(reference, members, sigma=blur_sigma, thresholds=(threshold,))
        self.real_blurred_rate = calib.rates[threshold]
        self.real_rate = replication(reference, members, thresholds=(threshold,)).rates[threshold]

    def score(self, x: torch.Tensor) -> dict:
        from ..eval import blurred_replication, quality, replication

        th = self.threshold
        rep = replication(x, self.members, thresholds=(th,))
        blur = blurred_replication(x, self.members, sigma=self.blur_sigma, thresholds=(th,))
        q = quality(x, self.reference, features=self.features, kid_subsets=10)
        return {
            "n": int(x.shape[0]),
            "replication_rate": rep.rates[th],
            "blurred_rate": blur.rates[th],
            "frechet": q.frechet_distance,
            "kid": q.kid_mean,
        }


def replication_cut(rate, base):
    return 1.0 - rate / base if base > 0 else 0.0


def score_row(rnd, cand, sc, ddim, attack, blurred_limit, steps, guided) -> dict:
    mode, alpha, scale, grange, solver, _ = (
        cand if cand is not None else ("ddim", None, 0.0, None, "ddim", steps)
    )
    return {
        "round": rnd,
        "mode": mode,
        "alpha": alpha,
        "scale": scale,
        "guidance_range": None if grange is None else list(grange),
        "solver": solver,
        "num_inference_steps": steps,
        **sc,
        "replication_cut": replication_cut(sc["replication_rate"], ddim["replication_rate"]),
        "blurred_limit": blurred_limit,
        "frechet_ratio": sc["frechet"] / max(ddim["frechet"], 1e-12),
        "membership_auc": attack.auc_two_sided,
        "membership_abs_z": attack.abs_z,
        "membership_direction": attack.direction,
        "model_evaluations_per_image": steps,
        "protector_evaluations_per_image": guided,
    }
