"""``cps.tune_guidance``: find guidance settings that protect, for this model and protector.

The paper's α = 0.001, s = 1000 can leave a small protector's gate shut, and the right mode,
α, s and guidance range depend on the protector and the model. The tuner measures, for each
candidate setting, on the user's own data:

- replication against the members: the nearest-member pixel-cosine rate above ``threshold``,
  plain and after a Gaussian blur of ``blur_sigma`` px on both sides
  (``eval.replication(..., blur_sigma=)``), and the cut relative to plain DDIM at the same seeds;
- quality: Fréchet distance (and KID) to the reference images in the feature space of one
  ``FeatureNet`` trained on them, as a ratio to plain DDIM's, pooled over the search seeds;
- membership: the ε̂ reconstruction-error attack, two-sided (``max(AUC, 1 − AUC)``, ``|z|``),
  members against the first ``n_nonmembers`` reference images.

Search: successive halving over the grid ``modes × alphas × scales × guidance_ranges``. Every
candidate is sampled on the search seeds with ``n0`` samples per seed; the best third (by the
ranking below) gets ``n0`` more samples per seed (the next noise counters, so the pool grows),
and so on for ``rounds`` rounds. Ranking: settings meeting every target first, by Fréchet ratio;
then the others by their total shortfall, each target's shortfall relative to its own range.

The recommendation is re-scored on ``holdout_seeds`` (never used in the search) with plain DDIM,
CPSample and rejection sampling at the same α (``eval.rejection_sample``); both the search
figures and the held-out ones are reported. ``TuneResult.write(out)`` writes the table (JSON and
CSV), the Pareto front and the cost PNGs, and the settings JSON that ``CPSampler.from_settings``
and ``cpsample sample --settings`` read.
"""

from __future__ import annotations

from .api import tune_guidance, tuned_settings
from .report import (
    CSV_COLUMNS,
    TuneResult,
    cost_points,
    rows_to_csv,
    save_cost_png,
    save_pareto_png,
)
from .space import MIN_SAMPLES_PER_SEED, HalvingPlan, candidate_grid
from .targets import Targets, pareto_front, recommend, shortfalls

__all__ = [
    "CSV_COLUMNS",
    "MIN_SAMPLES_PER_SEED",
    "HalvingPlan",
    "Targets",
    "TuneResult",
    "candidate_grid",
    "cost_points",
    "pareto_front",
    "recommend",
    "rows_to_csv",
    "save_cost_png",
    "save_pareto_png",
    "shortfalls",
    "tune_guidance",
    "tuned_settings",
]
