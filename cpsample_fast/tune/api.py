"""``tune_guidance``: check the request, run the search, re-score, write the settings."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

from .report import TuneResult
from .sampling import CandidateSampler
from .scoring import SCORE_KEYS, Scorer
from .search import rescore_holdout, successive_halving
from .space import HalvingPlan, candidate_grid
from .targets import Targets, as_targets, recommend


def _log_to_stderr(message: str) -> None:
    print(f"[tune] {message}", file=sys.stderr, flush=True)


def _check_data(members, reference, protector_meta):
    """``(members, reference)`` checked; the protector must have been trained on ``members``."""
    from ..eval.inputs import image_pair
    from ..protector import verify_protector

    if reference is None:
        raise ValueError(
            "reference images are required: real held-out images of the training distribution "
            "(Fréchet reference, blurred-rate calibration, membership non-members)"
        )
    if members is None:
        raise ValueError("members is required (got None)")
    mem, ref = image_pair(members, reference, "members", "reference")
    if ref.shape[0] < 4:
        raise ValueError(f"reference needs at least 4 images, got {ref.shape[0]}")
    if protector_meta is not None:
        try:
            verify_protector(protector_meta, mem)
        except ValueError as err:
            raise ValueError(
                f"protector does not protect these members (fingerprint mismatch): {err}"
            ) from None
    return mem, ref


def _check_seeds(seeds, holdout_seeds) -> tuple[list[int], list[int]]:
    seeds, holdout_seeds = [int(s) for s in seeds], [int(s) for s in holdout_seeds]
    if not seeds or not holdout_seeds or set(seeds) & set(holdout_seeds):
        raise ValueError(
            f"seeds {seeds} and holdout_seeds {holdout_seeds} must be non-empty and disjoint"
        )
    return seeds, holdout_seeds


def tune_guidance(
    eps_model,
    protector,
    schedule,
    members,
    reference,
    *,
    budget: int,
    targets: Targets | dict | None = None,
    protector_meta: dict | None = None,
    modes: Sequence[str] = ("repel", "entropy"),
    alphas: Sequence[float] = (0.3, 0.4, 0.45, 0.5),
    scales: Sequence[float] = (300.0, 1000.0, 3000.0, 8000.0),
    guidance_ranges: Sequence[tuple[int, int] | None] = (None,),
    samplers: Sequence[tuple[str, int]] | None = None,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    seeds: Sequence[int] = (0, 1),
    holdout_seeds: Sequence[int] = (2, 3),
    holdout_samples: int | None = None,
    rounds: int = 2,
    threshold: float = 0.98,
    blur_sigma: float = 1.0,
    n_nonmembers: int = 64,
    attack_timesteps: Sequence[int] = (50, 100, 200),
    rejection_budget: int | None = None,
    feature_steps: int = 200,
    batch_size: int = 128,
    backend: str = "auto",
    log=None,
) -> TuneResult:
    """Search guidance settings for targets; recommend one; re-score it on held-out seeds.

    Args:
        eps_model, protector, schedule: what ``CPSampler`` takes (nn.Modules: the settings file
            records their state-dict hashes).
        members: the protected training images ``[N, C, H, W]`` in [-1, 1] (the protector's).
        reference: real held-out images (Fréchet/KID reference, blurred-rate calibration and,
            the first ``n_nonmembers`` of them, the attack's non-members).
        budget: samples the search may draw in total, DDIM baselines included (the held-out
            re-score is extra: ``2 × len(holdout_seeds) × holdout_samples`` plus rejection).
        targets: :class:`Targets` (or a dict of its fields); default ``Targets()``.
        protector_meta: ``load_protector``'s metadata: the protector must have been trained on
            ``members`` (fingerprint), and the settings file records the fingerprint.
        modes, alphas, scales, guidance_ranges: the grid.
        samplers: ``(solver, steps)`` pairs searched too, e.g.
            ``[("ddim", 50), ("dpmsolver++", 8)]`` (default: DDIM at ``num_inference_steps``);
            each row records its solver, steps and model evaluations per image.
        num_inference_steps, eta: the DDIM baseline's steps (also the default sampler) and η
            (η > 0 only with DDIM).
        seeds: search seeds; holdout_seeds: seeds for the honest re-score (disjoint).
        holdout_samples: samples per held-out seed (default: the final search pool per seed).
        rounds: successive-halving rounds.
        threshold: pixel-cosine replication threshold; blur_sigma: blur in pixels.
        n_nonmembers: non-members of the membership attack; attack_timesteps: its timesteps.
        rejection_budget: draw budget of the rejection baseline (default 4 × its n).
        feature_steps: training steps of the Fréchet feature network.
        batch_size: samples per sampler call.
        backend: ``CPSampler`` backend.
        log: ``log(str)`` for progress lines (default: stderr).

    Raises:
        ValueError: budget too small for the grid, targets out of range, no reference set,
            seeds overlapping, a protector trained on other images (fingerprint mismatch).
    """
    log = log or _log_to_stderr
    targets = as_targets(targets)
    mem, ref = _check_data(members, reference, protector_meta)
    seeds, holdout_seeds = _check_seeds(seeds, holdout_seeds)
    grid = candidate_grid(modes, alphas, scales, guidance_ranges, samplers, num_inference_steps,
                          eta)  # fmt: skip
    plan = HalvingPlan.for_budget(len(grid), rounds, len(seeds), budget)
    t_start = time.perf_counter()
    scorer = Scorer(mem, ref, threshold=threshold, blur_sigma=blur_sigma,
                    feature_steps=feature_steps, seed=0)  # fmt: skip
    non = ref[: min(n_nonmembers, ref.shape[0])]
    sampling = CandidateSampler(
        eps_model, protector, schedule, members=mem, nonmembers=non,
        num_inference_steps=num_inference_steps, eta=eta, attack_timesteps=attack_timesteps,
        batch_size=batch_size, backend=backend,
    )  # fmt: skip
    blurred_limit = targets.blurred_factor * scorer.real_blurred_rate + targets.blurred_margin
    rows, drawn = successive_halving(sampling, scorer, grid, plan, seeds, targets, blurred_limit,
                                     log, started=t_start)  # fmt: skip
    best, unmet, unreachable = recommend(rows, targets, final_round=plan.rounds - 1)
    search_info = {
        "seeds": seeds,
        "samples_per_seed_final": plan.rounds * plan.n0,
        "grid_size": len(grid),
        "rounds": plan.rounds,
        "round_sizes": list(plan.sizes),
        "samples_drawn": drawn,
        "budget": int(budget),
        "real_blurred_rate": scorer.real_blurred_rate,
        "real_replication_rate": scorer.real_rate,
        "blurred_limit": blurred_limit,
        "threshold": threshold,
        "blur_sigma": blur_sigma,
        "num_inference_steps": num_inference_steps,
        "eta": eta,
        "seconds": time.perf_counter() - t_start,
    }
    nh = int(holdout_samples or plan.rounds * plan.n0)
    log(f"re-scoring the recommendation on held-out seeds {holdout_seeds} ({nh} per seed)")
    holdout = rescore_holdout(sampling, scorer, best, targets, holdout_seeds=holdout_seeds,
                              samples_per_seed=nh, blurred_limit=blurred_limit,
                              rejection_budget=rejection_budget)  # fmt: skip
    holdout["seconds"] = time.perf_counter() - t_start - search_info["seconds"]
    res = TuneResult(
        rows=rows,
        recommended=best,
        meets_targets=not unmet,
        unmet=unmet,
        unreachable=unreachable,
        holdout=holdout,
        targets=targets,
        settings=tuned_settings(
            best,
            targets,
            unmet,
            seeds,
            holdout,
            eta=eta,
            eps_model=eps_model,
            protector=protector,
            protector_meta=protector_meta,
        ),  # fmt: skip
        search=search_info,
    )
    log(res.summary())
    return res


def tuned_settings(
    best: dict, targets: Targets, unmet: Sequence[str], seeds: Sequence[int], holdout: dict, *,
    eta: float, eps_model, protector, protector_meta: dict | None,
) -> dict:  # fmt: skip
    """The settings file's content (``settings.make_settings``): the recommendation's sampler
    options, bound to both models' hashes, with what the search and the re-score measured."""
    from ..settings import make_settings

    rj = holdout["rejection"]
    rejection_keys = ("acceptance_rate", "n_accepted", "n_drawn", "model_evaluations_per_image",
                      "replication_cut")  # fmt: skip
    tuned = {
        "targets": asdict(targets),
        "meets_targets_in_search": not unmet,
        "unmet_in_search": list(unmet),
        "search": {k: best[k] for k in SCORE_KEYS},
        "search_seeds": list(seeds),
        "holdout": {k: holdout["cpsample"].get(k) for k in SCORE_KEYS},
        "holdout_seeds": holdout["seeds"],
        "holdout_meets_targets": holdout["cpsample"]["met"],
        "rejection_holdout": {k: rj.get(k) for k in rejection_keys},
    }
    sampler = {k: best[k] for k in ("mode", "alpha", "scale", "guidance_range",
                                    "num_inference_steps")}  # fmt: skip
    sampler.update(eta=eta, solver=best["solver"])
    return make_settings(sampler, eps_model, protector, protector_meta=protector_meta,
                         extra={"tuned": tuned})  # fmt: skip
