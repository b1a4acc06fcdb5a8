"""Quality-matched step count: the fewest DPM-Solver++ steps that match protected DDIM-50.

On the demo's digits model and protector, seeds pooled (default 0–3, 128 samples each):

- plain and protected DDIM-50 at the demo's guidance (``assets/digits_guidance.json``);
- plain DPM-Solver++ and protected DPM-Solver++ for each candidate ``STEPS:ALPHA:SCALE`` (repel).
  DPM-Solver++'s steps are 3–8× larger than DDIM-50's, and the guidance is gated (on only while the
  protector is confident): the same scale overshoots far past the gate in one large step, so a
  solver needs its own scale (benchmarks/README.md "Quality-matched DPM-Solver++");
- Fréchet distance to the held-out digits (the demo's trained features, pooled samples) and the
  replication rate (pixel cosine > 0.98, the demo's primary threshold), plain and after a
  σ = 1 px blur; a solver's cut is ``1 - rate(protected) / rate(plain)`` against its own plain
  run at the same step count;
- matched: Fréchet distance at most 5% above protected DDIM-50's and both cuts at most 2
  percentage points below (one-sided: better quality or more protection also count).

Candidates matched on the search seeds are then re-scored, with DDIM-50, on ``--holdout-seeds``
the search never saw, fewest steps first: the matched step count is the first that matches there
too (a scale picked on seeds 0–3 alone can sit on the edge of the Fréchet tolerance).
``--write-settings`` saves it as a settings file (``cpsample sample --settings``,
``CPSampler.from_settings``); the shipped one is ``assets/digits_guidance_dpm.json``, which
``cpsample bench --suite matched`` times against DDIM-50.

Writes ``dpm_quality_match.json`` and ``dpm_quality_match.png`` into ``--out`` and prints the
table. About 2 min per candidate on one CPU thread (512 samples).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from cpsample_fast.eval import blurred_replication, quality, replication, train_feature_net
from cpsample_fast.eval import demo as demo_lib
from cpsample_fast.eval.plots import save_lines_png
from cpsample_fast.io import write_json_atomic
from cpsample_fast.models import digits_split
from cpsample_fast.sampler import CPSampler
from cpsample_fast.schedule import NoiseSchedule
from cpsample_fast.settings import make_settings

# The candidates of the recorded run (chosen from the exploratory scan in benchmarks/README.md),
# in the order they are tried.
DEFAULT_CANDIDATES = ("6:0.45:130", "6:0.45:150", "8:0.45:170", "8:0.45:195", "10:0.45:215")


def _log(msg: str) -> None:
    print(f"[dpm-match] {msg}", file=sys.stderr, flush=True)


def parse_candidate(text: str) -> tuple[int, float, float]:
    try:
        steps, alpha, scale = text.split(":")
        return int(steps), float(alpha), float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a candidate is STEPS:ALPHA:SCALE (e.g. 10:0.45:215), got {text!r}"
        ) from None


class Scorer:
    """Samples a sampler configuration over seeds and scores it against the demo's data."""

    def __init__(self, n: int):
        self.split = digits_split()
        self.schedule = NoiseSchedule()
        config = demo_lib.DemoConfig(train=False)
        self.eps_model, self.protector, _, self.sources = demo_lib.load_or_train_models(
            config, self.split, self.schedule, _log
        )
        self.threshold = demo_lib.PRIMARY_THRESHOLD
        self.features = train_feature_net(self.split.evaluation, steps=200, seed=0)
        self.shape = (n, 1, 16, 16)

    def score(self, solver: str, steps: int, guidance: dict | None, seeds) -> dict:
        sampler = CPSampler(
            self.eps_model,
            self.protector if guidance else None,
            self.schedule,
            num_inference_steps=steps,
            solver=solver,
            **(guidance or {"scale": 0.0}),
        )
        t0 = time.perf_counter()
        x = torch.cat([sampler.sample(self.shape, seed=s) for s in seeds])
        sec = time.perf_counter() - t0
        members, thr = self.split.members, self.threshold
        res = {
            "replication": replication(x, members, thresholds=[thr]).rate(thr),
            "blurred": blurred_replication(x, members, sigma=1.0, thresholds=[thr]).rate(thr),
            "frechet": quality(x, self.split.evaluation, features=self.features).frechet_distance,
            "seconds": sec,
        }
        name = "protected" if guidance else "plain"
        _log(f"{solver}-{steps} {name} {guidance or ''} seeds {list(seeds)}: replication "
             f"{100 * res['replication']:.2f}% (blurred {100 * res['blurred']:.2f}%), "
             f"FD {res['frechet']:.2f}, {sec:.1f}s")  # fmt: skip
        return res


def compare(row: dict, base: dict, fd_tol: float, cut_tol: float) -> dict:
    """Cuts of ``row`` against its plain run, and its match against ``base`` (DDIM-50)."""
    for kind, name in (("replication", "cut"), ("blurred", "cut_blurred")):
        plain = row["plain"][kind]
        row[name] = 1 - row["protected"][kind] / plain if plain > 0 else None
    if base is None:
        return row
    row["fd_ratio"] = row["protected"]["frechet"] / base["protected"]["frechet"]
    row["cut_diff_pp"] = 100 * (row["cut"] - base["cut"])
    row["cut_blurred_diff_pp"] = 100 * (row["cut_blurred"] - base["cut_blurred"])
    cuts = (row["cut_diff_pp"], row["cut_blurred_diff_pp"])
    row["matched"] = bool(row["fd_ratio"] <= 1 + fd_tol and all(c >= -100 * cut_tol for c in cuts))
    return row


def run_seeds(scorer, candidates, seeds, args, cache) -> list[dict]:
    """DDIM-50 (row 0) and every candidate, each with its plain run, on ``seeds`` (runs already
    in ``cache`` are reused)."""
    demo_guidance = demo_lib.DemoConfig().guidance
    rows = []
    base = None
    for solver, steps, guidance in [("ddim", args.ddim_steps, demo_guidance)] + [
        ("dpmsolver++", k, {"alpha": a, "scale": s, "mode": "repel"}) for k, a, s in candidates
    ]:
        row = {"solver": solver, "steps": steps, "guidance": guidance, "seeds": list(seeds)}
        for name, g in (("plain", None), ("protected", guidance)):
            key = (solver, steps, tuple(sorted((g or {}).items())), tuple(seeds))
            if key not in cache:
                cache[key] = scorer.score(solver, steps, g, seeds)
            row[name] = cache[key]
        rows.append(compare(row, base, args.fd_tolerance, args.cut_tolerance))
        base = base or rows[0]
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(title)
    print(f"{'sampler':>16} {'alpha':>5} {'scale':>6} {'FD prot':>8} {'FD plain':>8} "
          f"{'repl':>6} {'blurred':>7} {'cut':>6} {'blur cut':>8} match")  # fmt: skip
    for r in rows:
        g = r["guidance"]
        m = "" if "matched" not in r else ("yes" if r["matched"] else "no")
        print(
            f"{r['solver'] + '-' + str(r['steps']):>16} {g['alpha']:5.2f} {g['scale']:6g} "
            f"{r['protected']['frechet']:8.2f} {r['plain']['frechet']:8.2f} "
            f"{100 * r['protected']['replication']:5.2f}% {100 * r['protected']['blurred']:6.2f}% "
            f"{100 * r['cut']:5.1f}% {100 * r['cut_blurred']:7.1f}% {m}"
        )


def holdout_check(scorer, rows, args, cache) -> tuple[dict | None, list[list[dict]]]:
    """The fewest steps that match on the search seeds *and* on the held-out seeds.

    Candidates that matched on the search seeds are re-scored on ``--holdout-seeds`` (with
    DDIM-50 on the same seeds) in order of step count; the first that matches again wins.
    Returns it (None if none holds) and every re-score made.
    """
    tries = []
    for row in sorted((r for r in rows[1:] if r["matched"]), key=lambda r: r["steps"]):
        g = row["guidance"]
        held = run_seeds(scorer, [(row["steps"], g["alpha"], g["scale"])],
                         args.holdout_seeds, args, cache)  # fmt: skip
        tries.append(held)
        print_table(held, f"held-out re-score: seeds {args.holdout_seeds}")
        if held[1]["matched"]:
            return row, tries
    return None, tries


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--holdout-seeds", type=int, nargs="+", default=[4, 5, 6, 7])
    p.add_argument("--n", type=int, default=128, help="samples per seed (default 128)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--candidates", type=parse_candidate, nargs="+",
                   default=[parse_candidate(c) for c in DEFAULT_CANDIDATES],
                   help="STEPS:ALPHA:SCALE for protected DPM-Solver++ (repel)")  # fmt: skip
    p.add_argument("--fd-tolerance", type=float, default=0.05)
    p.add_argument("--cut-tolerance", type=float, default=0.02)
    p.add_argument("--out", default="benchmarks/dpm_quality_match")
    p.add_argument("--write-settings", default=None,
                   help="save the matched candidate as a settings JSON here")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(args.n)
    cache: dict = {}
    rows = run_seeds(scorer, args.candidates, args.seeds, args, cache)
    print_table(rows, f"search: seeds {args.seeds} x {args.n} samples pooled")
    best, tries = holdout_check(scorer, rows, args, cache)
    holdout = tries[-1] if best is not None else None
    on_search = sorted({r["steps"] for r in rows[1:] if r["matched"]})
    print(f"matched on the search seeds: steps {on_search}; smallest that also matches on the "
          f"held-out seeds: {best and best['steps']}")  # fmt: skip

    report = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "candidates"},
            "candidates": [list(c) for c in args.candidates],
            "threshold": scorer.threshold,
            "sources": scorer.sources,
        },
        "rows": rows,
        "matched": best,
        "holdout": holdout,
        "holdout_tries": tries,
    }
    write_json_atomic(out / "dpm_quality_match.json", report)
    save_plot(rows, out / "dpm_quality_match.png", args)
    if best is not None and args.write_settings:
        write_settings(scorer, best, holdout, rows[0], args)
    return 0


def write_settings(scorer, best, holdout, base, args) -> None:
    sampler = {**best["guidance"], "guidance_range": None, "eta": 0.0,
               "num_inference_steps": best["steps"], "solver": "dpmsolver++"}  # fmt: skip
    extra = {
        "tuned": {
            "command": "python scripts/dpm_quality_match.py --write-settings "
            "cpsample_fast/assets/digits_guidance_dpm.json",
            "matched_against": f"protected ddim-{args.ddim_steps} at the demo's guidance",
            "targets": {"frechet_ratio": 1 + args.fd_tolerance,
                        "cut_pp": -100 * args.cut_tolerance},
            "search": {k: best[k] for k in ("seeds", "fd_ratio", "cut_diff_pp",
                                            "cut_blurred_diff_pp", "protected", "plain")},
            "ddim_search": {k: base[k] for k in ("protected", "plain", "cut", "cut_blurred")},
            "holdout": holdout and {k: holdout[1][k] for k in (
                "seeds", "fd_ratio", "cut_diff_pp", "cut_blurred_diff_pp", "matched",
                "protected", "plain")},
        }
    }  # fmt: skip
    settings = make_settings(sampler, scorer.eps_model, scorer.protector, extra=extra)
    write_json_atomic(Path(args.write_settings), settings)
    _log(f"wrote {args.write_settings}")


def save_plot(rows, path, args) -> None:
    dpm = rows[1:]
    xs = list(range(len(dpm)))
    save_lines_png(
        {
            "FD / DDIM-50 FD (protected)": (xs, [r["fd_ratio"] for r in dpm]),
            "cut - DDIM-50 cut (pp / 100)": (xs, [r["cut_diff_pp"] / 100 for r in dpm]),
            "blurred cut - DDIM-50's (pp / 100)": (
                xs,
                [r["cut_blurred_diff_pp"] / 100 for r in dpm],
            ),
        },
        path,
        xlabel="candidate (index into --candidates; rows of dpm_quality_match.json)",
        ylabel="ratio / difference",
        hlines=[1 + args.fd_tolerance, -args.cut_tolerance],
        title="DPM-Solver++ (steps:alpha:scale) vs protected DDIM-50",
    )


if __name__ == "__main__":
    sys.exit(main())
