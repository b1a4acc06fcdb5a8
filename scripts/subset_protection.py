"""Subset protection with a perfect memoriser (issue 8 item 1): copies of P ⊂ A, old vs new rule.

The eps-model is the exact empirical denoiser of a set A of 8×8 digits; the protector is trained
on P ⊂ A (random labels) with hold-out images from A∖P. Plain DDIM (50 steps, η = 0) returns
copies of P for some samples; CPSample should cut them while the samples stay copies of A∖P.
"old" is the pre-fix step (x̂0 = clip(x0 - s1/sa G), ε̂ = ε + G), kept here only to show the bug;
"delta" the consistent alternative that was not adopted (the clip caps the guidance); "new" the
package's step (guidance after the clip, docs/ALGORITHM.md §3 step 6).

    .venv/bin/python scripts/subset_protection.py [--out subset_protection.json]
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch

from cpsample_fast import CPSampler
from cpsample_fast.data import load_digits
from cpsample_fast.models import EmpiricalDenoiser
from cpsample_fast.protector import train_protector
from cpsample_fast.schedule import NoiseSchedule

_gu = importlib.import_module("cpsample_fast.ops._guided_update_op")

N_A, N_P = 48, 16  # |A|, |P|: P = A[:16], A∖P = A[16:]
COPY = 0.98  # nearest-neighbour pixel cosine above which a sample is a copy


def old_rule_update(x, o, g, z, coefs, rng, p, clip, draw, clipped_eps=False):
    """The pre-fix torch step (epsilon prediction, no noise): ε̂ = ε + G, x̂0 = clip(x0 - s1/sa G)."""
    sa, s1, sp, d, sigma, c = coefs.unbind(0)
    x0 = (x - s1 * o) / sa
    eps = o
    if g is not None:
        eps = eps + g
        x0 = x0 - (s1 / sa) * g
    if clip:
        x0 = torch.clamp(x0, -c, c)
    return sp * x0 + d * eps


def delta_rule_update(x, o, g, z, coefs, rng, p, clip, draw, clipped_eps=False):
    """An alternative (not adopted): clip the guided x̂0 and carry into ε̂ only the shift that
    survived the clip, Δ = clip(x0 - s1/sa G) - clip(x0), ε̂ = ε - (sa/s1)·Δ (epsilon prediction,
    no noise). Consistent too, but the clip caps the guidance's leverage: with clipping on it cut
    copies of P by 42-66% where guidance after the clip cuts 87%."""
    sa, s1, sp, d, sigma, c = coefs.unbind(0)
    x0 = (x - s1 * o) / sa
    x0g = x0 if g is None else x0 - (s1 / sa) * g
    x0_hat = torch.clamp(x0g, -c, c) if clip else x0g
    x0c = torch.clamp(x0, -c, c) if clip else x0
    eps = o - (sa / s1) * (x0_hat - x0c)
    return sp * x0_hat + d * eps


def setup(seed: int = 0, steps: int = 400, n_a: int = N_A, n_p: int = N_P):
    A = load_digits(n=n_a, size=8)
    P, rest = A[:n_p], A[n_p:]
    schedule = NoiseSchedule()
    protector, _ = train_protector(
        P,
        schedule=schedule,
        holdout=rest,
        steps=steps,
        batch_size=16,
        seed=seed,
        protector={"in_channels": 1, "resolution": 8, "base_channels": 16},
        progress=False,
    )
    protector.eval().requires_grad_(False)
    return A, P, rest, protector


def copy_rates(x, P, rest):
    """(fraction of samples that copy P, that copy A∖P): nearest-neighbour cosine > COPY."""

    def nn_cos(ref):
        a = torch.nn.functional.normalize(x.flatten(1).double(), dim=1)
        b = torch.nn.functional.normalize(ref.flatten(1).double(), dim=1)
        return (a @ b.T).max(1).values

    cp, cr = nn_cos(P), nn_cos(rest)
    return float(((cp > COPY) & (cp >= cr)).float().mean()), float(
        ((cr > COPY) & (cr > cp)).float().mean()
    )


def run(A, P, rest, protector, *, clip, mode, scale, alpha, n=200, seed=1, rule="new", **kw):
    schedule = NoiseSchedule(clip_sample=clip)
    model = EmpiricalDenoiser(A, schedule)
    sampler = CPSampler(
        model,
        protector if scale else None,
        schedule,
        num_inference_steps=50,
        scale=scale if scale else None,
        alpha=alpha if scale else None,
        mode=mode,
        backend="torch",
        **kw,
    )
    saved = _gu._IMPLS["torch"]
    if rule == "old":
        _gu._IMPLS["torch"] = old_rule_update
    elif rule == "delta":
        _gu._IMPLS["torch"] = delta_rule_update
    try:
        x = sampler.sample((n, 1, 8, 8), seed=seed)
    finally:
        _gu._IMPLS["torch"] = saved
    return copy_rates(x, P, rest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--train-steps", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    A, P, rest, protector = setup(steps=args.train_steps)
    print(f"protector trained in {time.time() - t0:.1f}s")
    settings = [
        ("ddim", "repel", 0.0, 0.5),
        ("entropy", "entropy", 225.0, 0.3),
        ("repel", "repel", 30.0, 0.5),
        ("repel", "repel", 100.0, 0.5),
        ("repel", "repel", 2000.0, 0.5),
        ("attract", "attract", 10.0, 0.5),
    ]
    rows = []
    for name, mode, scale, alpha in settings:
        for clip in (False, True):
            for rule in ("new",) if scale == 0 else ("old", "delta", "new"):
                t1 = time.time()
                p_rate, r_rate = run(
                    A,
                    P,
                    rest,
                    protector,
                    clip=clip,
                    mode=mode,
                    scale=scale,
                    alpha=alpha,
                    n=args.n,
                    rule=rule,
                )
                row = dict(
                    setting=name,
                    mode=mode,
                    scale=scale,
                    alpha=alpha,
                    clip=clip,
                    rule=rule,
                    copies_of_P=p_rate,
                    copies_of_rest=r_rate,
                )
                rows.append(row)
                print(
                    f"{name:8s} s={scale:6.1f} a={alpha} clip={clip!s:5} rule={rule}: "
                    f"copies of P {p_rate:.3f}, of A\\P {r_rate:.3f} "
                    f"({time.time() - t1:.1f}s)",
                    flush=True,
                )
    if args.out:
        from cpsample_fast.io import write_json_atomic

        write_json_atomic(args.out, {"n": args.n, "rows": rows})


if __name__ == "__main__":
    main()
