"""The search space and the successive-halving plan that fits it into a sample budget.

A candidate is ``(mode, alpha, scale, guidance_range, solver, steps)``: one point of the grid
``modes × alphas × scales × guidance_ranges × samplers``. Successive halving scores every
candidate in round 0 with ``n0`` samples per seed; each later round keeps the best third of
the previous one (``ceil(len / 3**r)`` candidates) and adds ``n0`` more samples per seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_SAMPLES_PER_SEED = 8

# (mode, alpha, scale, guidance_range or None, solver, steps)
Candidate = tuple


def candidate_grid(
    modes: Sequence[str],
    alphas: Sequence[float],
    scales: Sequence[float],
    guidance_ranges: Sequence[tuple[int, int] | None],
    samplers: Sequence[tuple[str, int]] | None,
    num_inference_steps: int,
    eta: float,
) -> list[Candidate]:
    """Every candidate of the grid, each value checked before any sampling."""
    from ..guidance import check_alpha, mode_id

    for m in modes:
        mode_id(m)
    for a in alphas:
        check_alpha(a)
    if not scales or any(not float(s) > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of numbers > 0, got {list(scales)}")
    ranges = [None if g is None else (int(g[0]), int(g[1])) for g in guidance_ranges]
    alphas_f, scales_f = [float(a) for a in alphas], [float(s) for s in scales]
    pairs = check_samplers(samplers, num_inference_steps, eta)
    guidance = itertools.product(modes, alphas_f, scales_f, ranges)
    return [(*g, *s) for g in guidance for s in pairs]


def check_samplers(samplers, num_inference_steps, eta) -> list[tuple[str, int]]:
    """The ``(solver, steps)`` pairs of the search, checked before any sampling."""
    from ..solvers import SOLVERS

    pairs = [("ddim", int(num_inference_steps))] if samplers is None else list(samplers)
    if not pairs:
        raise ValueError("samplers must be a non-empty list of (solver, steps) pairs")
    out = []
    for pair in pairs:
        try:
            solver, steps = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"samplers entries must be (solver, steps) pairs, got {pair!r}"
            ) from None
        if solver not in SOLVERS:
            raise ValueError(f"samplers: solver must be one of {SOLVERS}, got {solver!r}")
        if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
            raise ValueError(f"samplers: steps must be an int >= 1, got {steps!r}")
        if solver != "ddim" and eta:
            raise ValueError(f"samplers: {solver} is deterministic, it needs eta = 0 (got {eta})")
        out.append((solver, int(steps)))
    return out


@dataclass(frozen=True)
class HalvingPlan:
    """Round sizes and samples per seed and round (``n0``) for a budget.

    Attributes:
        sizes: Candidates scored in each round.
        n0: Samples per seed each candidate (and the DDIM baseline) gets per round.
    """

    sizes: tuple[int, ...]
    n0: int

    @property
    def rounds(self) -> int:
        return len(self.sizes)

    @classmethod
    def for_budget(cls, n_candidates: int, rounds: int, n_seeds: int, budget: int) -> HalvingPlan:
        """The plan spending at most ``budget`` samples, DDIM baselines included; ValueError
        when that leaves fewer than ``MIN_SAMPLES_PER_SEED`` per seed and candidate."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
        # Successive halving: round r scores ceil(len / 3**r) candidates with n0 more per seed.
        sizes = tuple(max(1, math.ceil(n_candidates / 3**r)) for r in range(rounds))
        per_unit = n_seeds * (sum(sizes) + rounds)  # candidates + the DDIM baseline each round
        n0 = int(budget) // per_unit if budget else 0
        if n0 < MIN_SAMPLES_PER_SEED:
            need = per_unit * MIN_SAMPLES_PER_SEED
            raise ValueError(
                f"budget {budget} is too small: {n_candidates} candidates, {rounds} round(s) and "
                f"{n_seeds} seed(s) need at least {need} samples ({MIN_SAMPLES_PER_SEED} per "
                "seed and candidate); raise the budget or shrink the grid"
            )
        return cls(sizes, n0)


def candidate_of(row):
    """The search candidate of a result row."""
    return (row["mode"], row["alpha"], row["scale"], guidance_range_of(row), row["solver"],
            row["num_inference_steps"])  # fmt: skip


def guidance_range_of(row):
    g = row["guidance_range"]
    return None if g is None else (int(g[0]), int(g[1]))
