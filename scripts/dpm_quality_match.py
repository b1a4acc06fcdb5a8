"""Quality-matched step count: the fewest DPM-Solver++ steps that match protected DDIM-50.

On the demo's digits model, protector and guidance settings (``cpsample_fast/cli/demo.py`` as of
this branch), for seeds pooled (default 0–3, 128 samples each):

- plain and protected DDIM-50, plain and protected DPM-Solver++ at each candidate step count;
- Fréchet distance to the held-out digits (the demo's trained features, pooled samples) and the
  replication rate (pixel cosine > 0.98, the demo's primary threshold); the cut of a solver is
  ``1 - rate(protected) / rate(plain)`` against its own plain run at the same step count.
- matched: Fréchet distance at most 5% above protected DDIM-50's and cuts (plain and after a
  σ = 1 px blur) at most 2 percentage points below (one-sided: better quality or more protection
  also count; the JSON holds both differences, so a two-sided reading can be checked too).

Writes ``dpm_quality_match.json`` and ``dpm_quality_match.png`` into ``--out`` and prints the
table. ``cpsample bench --suite matched`` then times DDIM-50 against the matched step count
(``cpsample_fast.bench.matched.MATCHED_DPM_STEPS``). About 6 min on one CPU thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from cpsample_fast.cli import demo
    from cpsample_fast.eval import blurred_replication, quality, replication, train_feature_net
    from cpsample_fast.eval.plots import save_lines_png
    from cpsample_fast.io import write_json_atomic
    from cpsample_fast.models import digits_split
    from cpsample_fast.sampler import CPSampler
    from cpsample_fast.schedule import NoiseSchedule

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--n", type=int, default=128, help="samples per seed (default 128)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--dpm-steps", type=int, nargs="+", default=[5, 6, 8, 10, 12, 15, 20, 25])
    p.add_argument("--fd-tolerance", type=float, default=0.05)
    p.add_argument("--cut-tolerance", type=float, default=0.02)
    p.add_argument("--out", default="benchmarks/dpm_quality_match")
    args = p.parse_args(argv)

    def log(msg):
        print(f"[dpm-match] {msg}", file=sys.stderr, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = digits_split()
    schedule = NoiseSchedule()
    eps_model, protector, _, sources = demo.load_or_train_models(
        argparse.Namespace(train=False), split, schedule, log
    )
    guidance = dict(scale=demo.DEFAULT_SCALE, alpha=demo.DEFAULT_ALPHA, mode=demo.DEFAULT_MODE)
    thr = demo.PRIMARY_THRESHOLD
    feature_net = train_feature_net(split.evaluation, steps=200, seed=0)
    shape = (args.n, 1, 16, 16)

    settings = [("ddim", args.ddim_steps)] + [("dpmsolver++", k) for k in args.dpm_steps]
    rows = []
    for solver, steps in settings:
        res = {"solver": solver, "steps": steps}
        for protected in (False, True):
            sampler = CPSampler(
                eps_model,
                protector if protected else None,
                schedule,
                num_inference_steps=steps,
                solver=solver,
                **(guidance if protected else {"scale": 0.0}),
            )
            t0 = time.perf_counter()
            x = torch.cat([sampler.sample(shape, seed=s) for s in args.seeds])
            sec = time.perf_counter() - t0
            rate = replication(x, split.members, thresholds=[thr]).rate(thr)
            blurred = blurred_replication(x, split.members, sigma=1.0, thresholds=[thr]).rate(thr)
            fd = quality(x, split.evaluation, features=feature_net).frechet_distance
            key = "protected" if protected else "plain"
            res[key] = {"replication": rate, "blurred": blurred, "frechet": fd, "seconds": sec}
            log(f"{solver}-{steps} {key}: replication {100 * rate:.1f}% (blurred "
                f"{100 * blurred:.1f}%), FD {fd:.2f}, {sec:.1f}s")  # fmt: skip
        for kind, name in (("replication", "cut"), ("blurred", "cut_blurred")):
            plain = res["plain"][kind]
            res[name] = 1 - res["protected"][kind] / plain if plain > 0 else None
        rows.append(res)

    base = rows[0]
    matched = None
    for r in rows[1:]:
        r["fd_ratio"] = r["protected"]["frechet"] / base["protected"]["frechet"]
        r["cut_diff_pp"] = 100 * (r["cut"] - base["cut"])
        r["cut_blurred_diff_pp"] = 100 * (r["cut_blurred"] - base["cut_blurred"])
        cuts = (r["cut_diff_pp"], r["cut_blurred_diff_pp"])
        r["matched"] = bool(
            r["fd_ratio"] <= 1 + args.fd_tolerance
            and all(c >= -100 * args.cut_tolerance for c in cuts)
        )
        r["matched_two_sided"] = bool(
            abs(r["fd_ratio"] - 1) <= args.fd_tolerance
            and all(abs(c) <= 100 * args.cut_tolerance for c in cuts)
        )
        if r["matched"] and matched is None:
            matched = r["steps"]

    print(f"seeds {args.seeds} x {args.n} samples pooled; guidance {guidance}; replication > {thr}")
    print(f"{'sampler':>16} {'FD prot':>8} {'FD plain':>8} {'repl prot':>9} {'cut':>7} "
          f"{'blur cut':>8} match")  # fmt: skip
    for r in rows:
        name = f"{r['solver']}-{r['steps']}"
        m = "" if r is base else ("yes" if r["matched"] else "no")
        print(
            f"{name:>16} {r['protected']['frechet']:8.2f} {r['plain']['frechet']:8.2f} "
            f"{100 * r['protected']['replication']:8.1f}% {100 * r['cut']:6.1f}% "
            f"{100 * r['cut_blurred']:7.1f}% {m}"
        )
    print(f"smallest matched DPM-Solver++ step count: {matched}")
    report = {
        "settings": {
            **vars(args),
            "guidance": guidance,
            "threshold": thr,
            "sources": sources,
            "demo_defaults": "cpsample_fast/assets/digits_guidance.json (the demo's defaults)",
        },
        "rows": rows,
        "matched_dpm_steps": matched,
    }
    write_json_atomic(out / "dpm_quality_match.json", report)
    ks = [r["steps"] for r in rows[1:]]
    save_lines_png(
        {
            "DPM-Solver++ FD / DDIM-50 FD (protected)": (ks, [r["fd_ratio"] for r in rows[1:]]),
            "DPM-Solver++ cut - DDIM-50 cut (pp / 100)": (
                ks,
                [r["cut_diff_pp"] / 100 for r in rows[1:]],
            ),
        },
        out / "dpm_quality_match.png",
        xlabel="DPM-Solver++ steps",
        ylabel="ratio / difference",
        hlines=[1 + args.fd_tolerance, -args.cut_tolerance],
        title="quality-matched DPM-Solver++ vs protected DDIM-50",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
