"""The tuner's result: ``TuneResult`` (summary, JSON/CSV table, PNGs, settings file)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .targets import Targets, pareto_front


@dataclass
class TuneResult:
    """The tuner's table, recommendation and held-out re-score (see module doc)."""

    rows: list[dict]
    recommended: dict
    meets_targets: bool
    unmet: list[str]
    unreachable: list[str]
    holdout: dict
    targets: Targets
    settings: dict
    search: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "targets": asdict(self.targets),
            "recommended": self.recommended,
            "meets_targets": self.meets_targets,
            "unmet_by_recommended": self.unmet,
            "unreachable_in_search": self.unreachable,
            "holdout": self.holdout,
            "search": self.search,
            "rows": self.rows,
            "pareto_front": pareto_front(self.rows),
        }

    def summary(self) -> str:
        r = self.recommended
        lines = [
            f"recommended: mode={r['mode']} alpha={r['alpha']:g} scale={r['scale']:g} "
            f"guidance_range={r['guidance_range']}"
            + ("" if self.meets_targets else f" (closest; misses {', '.join(self.unmet)})"),
            f"  search seeds {self.search.get('seeds')}: " + _fmt_scores(r),
        ]
        h = self.holdout.get("cpsample")
        if h:
            lines.append(f"  held-out seeds {self.holdout['seeds']}: " + _fmt_scores(h))
        rj = self.holdout.get("rejection")
        if rj:
            lines.append(
                f"  rejection (alpha={rj['alpha']:g}): accepted {rj['n_accepted']} of "
                f"{rj['n_drawn']} drawn, {rj['model_evaluations_per_image']} model evals/image"
            )
        if self.unreachable:
            lines.append(
                "  no searched setting meets: " + ", ".join(self.unreachable) + " (see the table)"
            )
        return "\n".join(lines)

    def write(self, out) -> dict[str, Path]:
        """Write ``tune.json``, ``tune.csv``, ``pareto.png``, ``cost.png``, ``settings.json``."""
        from ..io import atomic_path, write_json_atomic
        from ..settings import save_settings

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "table_json": out / "tune.json",
            "table_csv": out / "tune.csv",
            "pareto_png": out / "pareto.png",
            "cost_png": out / "cost.png",
            "settings": out / "settings.json",
        }
        write_json_atomic(paths["table_json"], self.to_dict())
        with atomic_path(paths["table_csv"]) as tmp:
            tmp.write_text(rows_to_csv(self.rows))
        save_pareto_png(self.rows, paths["pareto_png"], self.targets, self.recommended)
        costs = cost_points(self.holdout)
        if costs:
            save_cost_png(costs, paths["cost_png"])
        else:
            paths.pop("cost_png")
        save_settings(paths["settings"], self.settings)
        return paths


CSV_COLUMNS = (
    "round", "mode", "alpha", "scale", "guidance_range", "n", "replication_rate",
    "replication_cut", "blurred_rate", "blurred_limit", "frechet", "frechet_ratio", "kid",
    "membership_auc", "membership_abs_z", "model_evaluations_per_image", "met", "pareto",
)  # fmt: skip


def rows_to_csv(rows: Sequence[dict]) -> str:
    front = set(pareto_front(rows))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for i, r in enumerate(rows):
        vals = {**r, "pareto": i in front}
        w.writerow([_csv_value(vals.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "-".join(str(x) for x in v)
    return v


def _fmt_scores(r: dict) -> str:
    return (
        f"replication {100 * r['replication_rate']:.1f}% (cut {100 * r['replication_cut']:.1f}%), "
        f"blurred {100 * r['blurred_rate']:.1f}% (limit {100 * r['blurred_limit']:.1f}%), "
        f"Fréchet ratio {r['frechet_ratio']:.3f}, two-sided AUC {r['membership_auc']:.3f}"
    )


def cost_points(holdout: dict) -> dict[str, tuple[float, float]]:
    """``sampler -> (model evaluations per image, replication cut)`` of a held-out re-score."""
    pts = {}
    for name in ("ddim", "cpsample", "rejection"):
        r = holdout.get(name)
        if not r:
            continue
        if (
            r.get("model_evaluations_per_image") is not None
            and r.get("replication_cut") is not None
        ):
            pts[name] = (float(r["model_evaluations_per_image"]), float(r["replication_cut"]))
        elif r.get("model_evaluations"):  # rejection that kept nothing: a lower bound
            pts[name] = (float(r["model_evaluations"]), None)
    return pts


def save_pareto_png(rows, path, targets: Targets, recommended: dict | None) -> None:
    """Replication cut against Fréchet ratio for every scored setting; the front joined."""
    from ..eval.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = {"repel": "o", "attract": "^", "entropy": "s"}
    for mode in markers:
        pts = [r for r in rows if r["mode"] == mode]
        if pts:
            sc = ax.scatter(
                [r["frechet_ratio"] for r in pts],
                [100 * r["replication_cut"] for r in pts],
                c=[r["membership_auc"] for r in pts],
                cmap="viridis",
                vmin=0.5,
                vmax=1.0,
                marker=markers[mode],
                label=mode,
                edgecolors="k",
                linewidths=0.3,
            )
            fig.colorbar(sc, ax=ax, label="two-sided membership AUC") if mode == "repel" else None
    front = sorted((rows[i] for i in pareto_front(rows)), key=lambda r: r["frechet_ratio"])
    if front:
        ax.plot(
            [r["frechet_ratio"] for r in front],
            [100 * r["replication_cut"] for r in front],
            "k--",
            lw=0.8,
            label="Pareto front",
        )
    if recommended:
        ax.scatter(
            [recommended["frechet_ratio"]],
            [100 * recommended["replication_cut"]],
            marker="*",
            s=250,
            c="red",
            label="recommended (search seeds)",
        )
    ax.axhline(100 * targets.replication_cut, color="gray", lw=0.7, ls=":")
    ax.axvline(targets.frechet_ratio, color="gray", lw=0.7, ls=":")
    ax.set_xlabel("Fréchet distance / plain DDIM's (lower is better)")
    ax.set_ylabel("replication cut vs plain DDIM (%)")
    ax.set_title("guidance settings: protection vs quality")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def save_cost_png(points: dict[str, tuple[float, float | None]], path) -> None:
    """Replication cut against model evaluations per image, one point per sampler (a cut of
    None: nothing accepted, the cost is the lower bound ``evaluations spent``)."""
    from ..eval.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    colors = {"ddim": "tab:gray", "cpsample": "tab:blue", "rejection": "tab:orange"}
    for name, (cost, cut) in points.items():
        if not math.isfinite(cost):
            continue
        if cut is None:  # nothing accepted: cost is a lower bound, the cut is unmeasurable
            ax.scatter([cost], [0], s=80, marker="x", c=colors.get(name, "k"), label=name)
            ax.annotate(f"{name}: 0 kept, > {cost:.0f} evals/image", (cost, 0),
                        textcoords="offset points", xytext=(-120, 8), fontsize=8)  # fmt: skip
            continue
        ax.scatter([cost], [100 * cut], s=80, c=colors.get(name, "k"), label=name)
        ax.annotate(name, (cost, 100 * cut), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("eps-model evaluations per accepted image (log)")
    ax.set_ylabel("replication cut vs plain DDIM (%)")
    ax.set_title("protection against cost")
    ax.legend(fontsize=8)
    _save(fig, path)
