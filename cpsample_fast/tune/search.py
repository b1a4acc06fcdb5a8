"""The tuner's two stages: successive halving on the search seeds, then the honest re-score of
the recommendation on held-out seeds beside plain DDIM and rejection sampling."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .sampling import DDIM, CandidateSampler
from .scoring import Scorer, replication_cut, score_row
from .space import Candidate, HalvingPlan, candidate_of
from .targets import Targets, rank_key, unmet_targets


def successive_halving(
    sampling: CandidateSampler,
    scorer: Scorer,
    grid: Sequence[Candidate],
    plan: HalvingPlan,
    seeds: Sequence[int],
    targets: Targets,
    blurred_limit: float,
    log: Callable[[str], None],
    started: float | None = None,
) -> tuple[list[dict], int]:
    """Score every candidate of ``grid``, keep the best third each round (the plan: module
    :mod:`cpsample_fast.tune.space`). Returns ``(rows of every round, samples drawn)``; the log
    lines count seconds from ``started`` (``time.perf_counter()``; default: now)."""
    t_start = time.perf_counter() if started is None else started
    empty = torch.empty((0, *sampling.shape))
    pools: dict = {}  # candidate -> {seed: samples so far}
    ddim_pool = {s: empty for s in seeds}
    rows: list[dict] = []
    alive, drawn = list(grid), 0
    for rnd in range(plan.rounds):
        n_have = rnd * plan.n0
        for s in seeds:
            more = sampling.draw(DDIM, s, n_have, plan.n0)
            ddim_pool[s] = torch.cat([ddim_pool[s], more])
            drawn += plan.n0
        ddim = scorer.score(torch.cat([ddim_pool[s] for s in seeds]))
        scored = []
        for i, cand in enumerate(alive):
            pool = pools.setdefault(cand, {s: empty for s in seeds})
            for s in seeds:
                pool[s] = torch.cat([pool[s], sampling.draw(cand, s, n_have, plan.n0)])
                drawn += plan.n0
            sc = scorer.score(torch.cat([pool[s] for s in seeds]))
            row = score_row(rnd, cand, sc, ddim, sampling.attack(cand), blurred_limit, cand[5],
                            sampling.guided_steps(cand))  # fmt: skip
            row["met"] = not unmet_targets(row, targets)
            scored.append(row)
            where = f"round {rnd + 1}/{plan.rounds} [{i + 1}/{len(alive)}]"
            log(f"{where} {_describe(cand)}: {_scores(row)} ({time.perf_counter() - t_start:.0f}s)")
        rows.extend(scored)
        scored.sort(key=lambda r: rank_key(r, targets))
        if rnd + 1 < plan.rounds:
            alive = [candidate_of(r) for r in scored[: plan.sizes[rnd + 1]]]
    return rows, drawn


def _describe(cand: Candidate) -> str:
    mode, alpha, scale, grange, solver, steps = cand
    rng = "" if grange is None else f" range={grange}"
    return f"{solver}-{steps} {mode} α={alpha:g} s={scale:g}{rng}"


def _scores(row: dict) -> str:
    return (
        f"cut {100 * row['replication_cut']:.1f}%, blurred {100 * row['blurred_rate']:.1f}%, "
        f"FD ratio {row['frechet_ratio']:.2f}, AUC2 {row['membership_auc']:.3f}"
    )


def rescore_holdout(
    sampling: CandidateSampler,
    scorer: Scorer,
    best: dict,
    targets: Targets,
    *,
    holdout_seeds: Sequence[int],
    samples_per_seed: int,
    blurred_limit: float,
    rejection_budget: int | None,
) -> dict:
    """DDIM, the recommendation and rejection sampling at its α, on seeds the search never
    saw: ``{"seeds", "samples_per_seed", "ddim", "cpsample", "rejection"}``."""
    cand, nh = candidate_of(best), samples_per_seed
    xd = torch.cat([sampling.draw(DDIM, s, 0, nh) for s in holdout_seeds])
    xc = torch.cat([sampling.draw(cand, s, 0, nh) for s in holdout_seeds])
    hd, hc = scorer.score(xd), scorer.score(xc)
    eps_attack = sampling.attack(None)
    steps = sampling.num_inference_steps
    cps = score_row(None, cand, hc, hd, sampling.attack(cand), blurred_limit,
                    best["num_inference_steps"], sampling.guided_steps(cand))  # fmt: skip
    unmet = unmet_targets(cps, targets)
    cps["met"], cps["unmet"] = not unmet, unmet
    holdout = {
        "seeds": list(holdout_seeds),
        "samples_per_seed": nh,
        "ddim": score_row(None, None, hd, hd, eps_attack, blurred_limit, steps, 0),
        "cpsample": cps,
    }
    n_rej = nh * len(holdout_seeds)
    rej = sampling.rejection(n_rej, alpha=best["alpha"], seed=holdout_seeds[0],
                             max_draws=int(rejection_budget or 4 * n_rej))  # fmt: skip
    rj = {"sampler": "rejection", "alpha": best["alpha"], **rej.to_dict()}
    rj["model_evaluations_per_image"] = rj.pop("model_evaluations_per_accepted")
    # Rejection leaves the model as it is: an attacker queries the same ε (the ε attack).
    rj["membership_auc"] = eps_attack.auc_two_sided
    rj["membership_abs_z"] = eps_attack.abs_z
    rj["membership_note"] = "rejection does not change the denoiser: the ε attack applies"
    if rej.n_accepted >= 2:
        hr = scorer.score(rej.samples)
        rj.update(hr)
        rj["replication_cut"] = replication_cut(hr["replication_rate"], hd["replication_rate"])
        rj["frechet_ratio"] = hr["frechet"] / max(hd["frechet"], 1e-12)
    else:
        rj.update(replication_rate=None, blurred_rate=None, replication_cut=None,
                  frechet=None, frechet_ratio=None)  # fmt: skip
    holdout["rejection"] = rj
    return holdout
