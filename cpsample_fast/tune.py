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

import csv
import io
import itertools
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MIN_SAMPLES_PER_SEED = 8


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


def _rank_key(row: dict, targets: Targets):
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
    best = min(final, key=lambda r: _rank_key(r, targets))
    unmet = [k for k, v in shortfalls(best, targets).items() if v > 0]
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
        from .io import atomic_path, write_json_atomic
        from .settings import save_settings

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
    from .eval.plots import _plt, _save

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
    from .eval.plots import _plt, _save

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


class _Scorer:
    """Everything one evaluation of a sample set needs, built once."""

    def __init__(self, members, reference, *, threshold, blur_sigma, feature_steps, seed):
        from .eval import blurred_replication, replication, train_feature_net

        self.members, self.reference = members, reference
        self.threshold, self.blur_sigma = threshold, blur_sigma
        self.features = train_feature_net(reference, steps=feature_steps, seed=seed)
        calib = blurred_replication(reference, members, sigma=blur_sigma, thresholds=(threshold,))
        self.real_blurred_rate = calib.rates[threshold]
        self.real_rate = replication(reference, members, thresholds=(threshold,)).rates[threshold]

    def score(self, x: torch.Tensor) -> dict:
        from .eval import blurred_replication, quality, replication

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


def _check_images(x, name):
    from .eval.replication import as_image_batch

    if x is None:
        raise ValueError(f"{name} is required (got None)")
    return as_image_batch(x, name)


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
    from .eval import membership_inference, rejection_sample
    from .guidance import check_alpha, mode_id
    from .protector import verify_protector
    from .sampler import CPSampler
    from .settings import make_settings
    from .solvers import solver_timesteps

    log = log or (lambda m: print(f"[tune] {m}", file=sys.stderr, flush=True))
    if targets is None:
        targets = Targets()
    elif isinstance(targets, dict):
        unknown = set(targets) - set(Targets.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown targets {sorted(unknown)}; known: {list(Targets.__dataclass_fields__)}"
            )
        targets = Targets(**targets)
    targets.check()
    if reference is None:
        raise ValueError(
            "reference images are required: real held-out images of the training distribution "
            "(Fréchet reference, blurred-rate calibration, membership non-members)"
        )
    mem = _check_images(members, "members")
    ref = _check_images(reference, "reference")
    if mem.shape[1:] != ref.shape[1:]:
        raise ValueError(
            f"members and reference must share the image shape, got {tuple(mem.shape[1:])} and "
            f"{tuple(ref.shape[1:])}"
        )
    if ref.shape[0] < 4:
        raise ValueError(f"reference needs at least 4 images, got {ref.shape[0]}")
    if protector_meta is not None:
        try:
            verify_protector(protector_meta, mem)
        except ValueError as err:
            raise ValueError(
                f"protector does not protect these members (fingerprint mismatch): {err}"
            ) from None
    for m in modes:
        mode_id(m)
    for a in alphas:
        check_alpha(a)
    if not scales or any(not float(s) > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of numbers > 0, got {list(scales)}")
    seeds, holdout_seeds = [int(s) for s in seeds], [int(s) for s in holdout_seeds]
    if not seeds or not holdout_seeds or set(seeds) & set(holdout_seeds):
        raise ValueError(
            f"seeds {seeds} and holdout_seeds {holdout_seeds} must be non-empty and disjoint"
        )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    ranges = [None if g is None else (int(g[0]), int(g[1])) for g in guidance_ranges]
    alphas_f, scales_f = [float(a) for a in alphas], [float(s) for s in scales]
    samplers = _check_samplers(samplers, num_inference_steps, eta)
    guidance = itertools.product(modes, alphas_f, scales_f, ranges)
    grid = [(*g, *s) for g in guidance for s in samplers]
    # Successive halving: round r scores ceil(len / 3**r) candidates with n0 more per seed.
    sizes = [max(1, math.ceil(len(grid) / 3**r)) for r in range(rounds)]
    per_unit = len(seeds) * (sum(sizes) + rounds)  # candidates + the DDIM baseline each round
    n0 = int(budget) // per_unit if budget else 0
    if n0 < MIN_SAMPLES_PER_SEED:
        need = per_unit * MIN_SAMPLES_PER_SEED
        raise ValueError(
            f"budget {budget} is too small: {len(grid)} candidates, {rounds} round(s) and "
            f"{len(seeds)} seed(s) need at least {need} samples ({MIN_SAMPLES_PER_SEED} per seed "
            "and candidate); raise the budget or shrink the grid"
        )
    shape = (*mem.shape[1:],)
    t_start = time.perf_counter()
    scorer = _Scorer(mem, ref, threshold=threshold, blur_sigma=blur_sigma,
                     feature_steps=feature_steps, seed=0)  # fmt: skip
    non = ref[: min(n_nonmembers, ref.shape[0])]
    blurred_limit = targets.blurred_factor * scorer.real_blurred_rate + targets.blurred_margin

    def draw(scale, mode, alpha, grange, seed, offset, n, solver="ddim", steps=None):
        sampler = CPSampler(
            eps_model,
            protector if scale else None,
            schedule,
            num_inference_steps=steps or num_inference_steps,
            solver=solver,
            eta=eta,
            scale=scale,
            alpha=alpha,
            mode=mode,
            guidance_range=grange,
            backend=backend,
        )
        out = []
        for s in range(0, n, batch_size):
            b = min(batch_size, n - s)
            out.append(sampler.sample((b, *shape), seed=seed, sample_offset=offset + s))
        return torch.cat(out)

    def attack(mode, alpha, scale, grange):
        r = membership_inference(
            eps_model, mem, non, schedule, timesteps=attack_timesteps, protector=protector,
            scale=scale, alpha=alpha, mode=mode, guidance_range=grange,
        )  # fmt: skip
        return r

    def guided_steps(grange, solver="ddim", steps=None):
        ts = solver_timesteps(schedule, steps or num_inference_steps, solver)
        if grange is None:
            return len(ts)
        return int(((ts >= grange[0]) & (ts <= grange[1])).sum())

    pools: dict = {}  # candidate -> {seed: tensor}
    ddim_pool: dict = {s: torch.empty((0, *shape)) for s in seeds}
    attacks: dict = {}
    rows: list[dict] = []
    alive = list(grid)
    total_drawn = 0
    for rnd in range(rounds):
        n_have = rnd * n0
        for s in seeds:
            ddim_pool[s] = torch.cat([ddim_pool[s], draw(0.0, "repel", 0.5, None, s, n_have, n0)])
            total_drawn += n0
        ddim = scorer.score(torch.cat([ddim_pool[s] for s in seeds]))
        scored = []
        for i, cand in enumerate(alive):
            mode, alpha, scale, grange, solver, steps = cand
            pool = pools.setdefault(cand, {s: torch.empty((0, *shape)) for s in seeds})
            for s in seeds:
                more = draw(scale, mode, alpha, grange, s, n_have, n0, solver, steps)
                pool[s] = torch.cat([pool[s], more])
                total_drawn += n0
            sc = scorer.score(torch.cat([pool[s] for s in seeds]))
            key = cand[:4]  # the attack queries ε̂ of one step: the solver plays no part
            if key not in attacks:
                attacks[key] = attack(mode, alpha, scale, grange)
            a = attacks[key]
            row = _row(rnd, cand, sc, ddim, a, blurred_limit, steps,
                       guided_steps(grange, solver, steps))  # fmt: skip
            row["met"] = not any(shortfalls(row, targets).values())
            scored.append(row)
            log(
                f"round {rnd + 1}/{rounds} [{i + 1}/{len(alive)}] {solver}-{steps} {mode} "
                f"α={alpha:g} s={scale:g}"
                f"{'' if grange is None else f' range={grange}'}: cut "
                f"{100 * row['replication_cut']:.1f}%, blurred {100 * row['blurred_rate']:.1f}%, "
                f"FD ratio {row['frechet_ratio']:.2f}, AUC2 {row['membership_auc']:.3f} "
                f"({time.perf_counter() - t_start:.0f}s)"
            )
        rows.extend(scored)
        scored.sort(key=lambda r: _rank_key(r, targets))
        if rnd + 1 < rounds:
            keep = sizes[rnd + 1]
            alive = [_cand(r) for r in scored[:keep]]
    best, unmet, unreachable = recommend(rows, targets, final_round=rounds - 1)
    search_info = {
        "seeds": seeds,
        "samples_per_seed_final": rounds * n0,
        "grid_size": len(grid),
        "rounds": rounds,
        "round_sizes": sizes,
        "samples_drawn": total_drawn,
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

    # Honest re-score on seeds the search never saw: DDIM, CPSample and rejection at the same α.
    cand = _cand(best)
    nh = int(holdout_samples or rounds * n0)
    log(f"re-scoring the recommendation on held-out seeds {holdout_seeds} ({nh} per seed)")
    xd = torch.cat([draw(0.0, "repel", 0.5, None, s, 0, nh) for s in holdout_seeds])
    xc = torch.cat([draw(best["scale"], best["mode"], best["alpha"], _grange(best), s, 0, nh,
                         best["solver"], best["num_inference_steps"])
                    for s in holdout_seeds])  # fmt: skip
    hd, hc = scorer.score(xd), scorer.score(xc)
    eps_attack = membership_inference(eps_model, mem, non, schedule, timesteps=attack_timesteps)
    holdout = {
        "seeds": holdout_seeds,
        "samples_per_seed": nh,
        "ddim": _row(None, None, hd, hd, eps_attack, blurred_limit, num_inference_steps, 0),
        "cpsample": _row(
            None,
            cand,
            hc,
            hd,
            attacks[cand[:4]],
            blurred_limit,
            best["num_inference_steps"],
            guided_steps(_grange(best), best["solver"], best["num_inference_steps"]),
        ),  # fmt: skip
    }
    holdout["cpsample"]["met"] = not any(shortfalls(holdout["cpsample"], targets).values())
    holdout["cpsample"]["unmet"] = [
        k for k, v in shortfalls(holdout["cpsample"], targets).items() if v > 0
    ]
    n_rej = nh * len(holdout_seeds)
    rej = rejection_sample(
        eps_model, protector, schedule, n_rej, alpha=best["alpha"],
        num_inference_steps=num_inference_steps, eta=eta, sample_shape=shape,
        seed=holdout_seeds[0], max_draws=int(rejection_budget or 4 * n_rej),
        batch_size=batch_size, backend=backend,
    )  # fmt: skip
    rj = {"sampler": "rejection", "alpha": best["alpha"], **rej.to_dict()}
    rj["model_evaluations_per_image"] = rj.pop("model_evaluations_per_accepted")
    # Rejection leaves the model as it is: an attacker queries the same ε (the ε attack).
    rj["membership_auc"] = eps_attack.auc_two_sided
    rj["membership_abs_z"] = eps_attack.abs_z
    rj["membership_note"] = "rejection does not change the denoiser: the ε attack applies"
    if rej.n_accepted >= 2:
        hr = scorer.score(rej.samples)
        rj.update(hr)
        rj["replication_cut"] = _cut(hr["replication_rate"], hd["replication_rate"])
        rj["frechet_ratio"] = hr["frechet"] / max(hd["frechet"], 1e-12)
    else:
        rj.update(replication_rate=None, blurred_rate=None, replication_cut=None,
                  frechet=None, frechet_ratio=None)  # fmt: skip
    holdout["rejection"] = rj
    holdout["seconds"] = time.perf_counter() - t_start - search_info["seconds"]
    settings = make_settings(
        {
            "mode": best["mode"],
            "alpha": best["alpha"],
            "scale": best["scale"],
            "guidance_range": best["guidance_range"],
            "num_inference_steps": best["num_inference_steps"],
            "eta": eta,
            "solver": best["solver"],
        },
        eps_model,
        protector,
        protector_meta=protector_meta,
        extra={
            "tuned": {
                "targets": asdict(targets),
                "meets_targets_in_search": not unmet,
                "unmet_in_search": unmet,
                "search": {k: best[k] for k in _SCORE_KEYS},
                "search_seeds": seeds,
                "holdout": {k: holdout["cpsample"].get(k) for k in _SCORE_KEYS},
                "holdout_seeds": holdout_seeds,
                "holdout_meets_targets": holdout["cpsample"]["met"],
                "rejection_holdout": {
                    k: rj.get(k)
                    for k in (
                        "acceptance_rate",
                        "n_accepted",
                        "n_drawn",
                        "model_evaluations_per_image",
                        "replication_cut",
                    )
                },  # fmt: skip
            }
        },
    )
    res = TuneResult(
        rows=rows,
        recommended=best,
        meets_targets=not unmet,
        unmet=unmet,
        unreachable=unreachable,
        holdout=holdout,
        targets=targets,
        settings=settings,
        search=search_info,
    )
    log(res.summary())
    return res


_SCORE_KEYS = (
    "replication_rate", "replication_cut", "blurred_rate", "blurred_limit", "frechet",
    "frechet_ratio", "kid", "membership_auc", "membership_abs_z", "model_evaluations_per_image",
)  # fmt: skip


def _check_samplers(samplers, num_inference_steps, eta) -> list[tuple[str, int]]:
    """The ``(solver, steps)`` pairs of the search, checked before any sampling."""
    from .solvers import SOLVERS

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


def _cand(row):
    """The search candidate of a result row."""
    return (row["mode"], row["alpha"], row["scale"], _grange(row), row["solver"],
            row["num_inference_steps"])  # fmt: skip


def _grange(row):
    g = row["guidance_range"]
    return None if g is None else (int(g[0]), int(g[1]))


def _cut(rate, base):
    return 1.0 - rate / base if base > 0 else 0.0


def _row(rnd, cand, sc, ddim, attack, blurred_limit, steps, guided) -> dict:
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
        "replication_cut": _cut(sc["replication_rate"], ddim["replication_rate"]),
        "blurred_limit": blurred_limit,
        "frechet_ratio": sc["frechet"] / max(ddim["frechet"], 1e-12),
        "membership_auc": attack.auc_two_sided,
        "membership_abs_z": attack.abs_z,
        "membership_direction": attack.direction,
        "model_evaluations_per_image": steps,
        "protector_evaluations_per_image": guided,
    }
