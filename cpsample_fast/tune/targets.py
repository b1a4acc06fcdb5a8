"""What the tuner is asked for and how it ranks scored settings (``Targets``, ``recommend``).

Ranking: settings meeting every target first, by Fréchet ratio; then the others by their total
shortfall, each target's shortfall relative to its own range (``_SHORTFALL_SCALE``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Targets:
    """What the user asks of a setting (docs of each field give the direction).

    Attributes:
        replication_cut: ≥ this fraction of plain DDIM's replication rate removed (in [0, 1]).
        blurred_factor, blurred_margin: blurred near-copy rate ≤ ``factor × (rate of real
            held-out reference images) + margin`` (factor ≥ 0, margin in [0, 1]).
        frechet_ratio: Fréchet distance ≤ this multiple of plain DDIM's (> 0).
        membership_auc: two-sided ε̂ attack AUC ``max(AUC, 1 − AUC)`` ≤ this (in [0.5, 1]).
    """

    replication_cut: float = 0.9
    blurred_factor: float = 2.0
    blurred_margin: float = 0.01
    frechet_ratio: float = 1.3
    membership_auc: float = 0.65

    def check(self) -> Targets:
        problems = []
        if not 0.0 <= self.replication_cut <= 1.0:
            problems.append(f"replication_cut must lie in [0, 1], got {self.replication_cut}")
        if not self.blurred_factor >= 0.0:
            problems.append(f"blurred_factor must be >= 0, got {self.blurred_factor}")
        if not 0.0 <= self.blurred_margin <= 1.0:
            problems.append(f"blurred_margin must lie in [0, 1], got {self.blurred_margin}")
        if not (self.frechet_ratio > 0.0 and math.isfinite(self.frechet_ratio)):
            problems.append(f"frechet_ratio must be a finite number > 0, got {self.frechet_ratio}")
        if not 0.5 <= self.membership_auc <= 1.0:
            problems.append(
                f"membership_auc (two-sided) must lie in [0.5, 1], got {self.membership_auc}"
            )
        if problems:
            raise ValueError("targets out of range: " + "; ".join(problems))
        return self


# Each target's shortfall is divided by this scale before summing (units of the target).
_SHORTFALL_SCALE = {
    "replication_cut": 0.1,
    "blurred_rate": 0.02,
    "frechet_ratio": 0.2,
    "membership_auc": 0.1,
}


def shortfalls(row: dict, targets: Targets) -> dict[str, float]:
    """Per target, how far ``row`` misses it (0 when met), in the target's own units."""
    return {
        "replication_cut": max(0.0, targets.replication_cut - row["replication_cut"]),
        "blurred_rate": max(0.0, row["blurred_rate"] - row["blurred_limit"]),
        "frechet_ratio": max(0.0, row["frechet_ratio"] - targets.frechet_ratio),
        "membership_auc": max(0.0, row["membership_auc"] - targets.membership_auc),
    }


def rank_key(row: dict, targets: Targets):
    sf = shortfalls(row, targets)
    total = sum(v / _SHORTFALL_SCALE[k] for k, v in sf.items())
    return (total > 0, total, row["frechet_ratio"], row["membership_auc"])


def recommend(rows: Sequence[dict], targets: Targets, *, final_round: int | None = None):
    """The best row of the final round and what it misses.

    Returns:
        ``(best, unmet, unreachable)``: the best setting (meets every target, lowest Fréchet
        ratio; else the smallest total shortfall), the targets it misses, and the targets that
        no scored row meets at all.
    """
    if not rows:
        raise ValueError("no scored settings to recommend from")
    final = [r for r in rows if final_round is None or r["round"] == final_round]
    best = min(final, key=lambda r: rank_key(r, targets))
    unmet = unmet_targets(best, targets)
    unreachable = [k for k in _SHORTFALL_SCALE if all(shortfalls(r, targets)[k] > 0 for r in rows)]
    return best, unmet, unreachable


def pareto_front(rows: Sequence[dict]) -> list[int]:
    """Indices of rows not dominated in (replication_cut ↑, frechet_ratio ↓, membership_auc ↓)."""
    front = []
    for i, a in enumerate(rows):
        dominated = False
        for j, b in enumerate(rows):
            if i == j:
                continue
            ge = (
                b["replication_cut"] >= a["replication_cut"]
                and b["frechet_ratio"] <= a["frechet_ratio"]
                and b["membership_auc"] <= a["membership_auc"]
            )
            gt = (
                b["replication_cut"] > a["replication_cut"]
                or b["frechet_ratio"] < a["frechet_ratio"]
                or b["membership_auc"] < a["membership_auc"]
            )
            if ge and gt:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def as_targets(targets: Targets | dict | None) -> Targets:
    """``targets`` as checked :class:`Targets` (a dict of its fields, or ``None``: defaults)."""
    if targets is None:
        targets = Targets()
    elif isinstance(targets, dict):
        unknown = set(targets) - set(Targets.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown targets {sorted(unknown)}; known: {list(Targets.__dataclass_fields__)}"
            )
        targets = Targets(**targets)
    return targets.check()


def unmet_targets(row: dict, targets: Targets) -> list[str]:
    """The targets ``row`` misses (empty: it meets them all)."""
    return [k for k, v in shortfalls(row, targets).items() if v > 0]
