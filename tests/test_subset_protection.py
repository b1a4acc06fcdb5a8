"""Subset protection with a perfect memoriser (issue 8 item 1): the outcome the rule is for.

A = 48 8×8 digits, the eps-model is A's exact empirical denoiser (every DDIM endpoint is a copy
of an image of A); the protector is trained on P = A[:16] (random labels) with A∖P as hold-out.
A sample "copies P" when its nearest neighbour in A is in P with pixel cosine > 0.98.
scripts/subset_protection.py prints the full table (old vs new rule, clip on/off, settings).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sp = importlib.import_module("subset_protection")

N = 150  # samples per run


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    return sp.setup(steps=1000)


def _rates(setup, **kw):
    A, P, rest, prot = setup
    return sp.run(A, P, rest, prot, n=N, **kw)


@pytest.mark.slow
def test_subset_protection(setup):
    plain = _rates(setup, clip=True, mode="repel", scale=0.0, alpha=0.5)[0]
    rows = {}
    for name, kw in {
        "old repel s=300 clip": dict(clip=True, mode="repel", scale=300.0, alpha=0.5, rule="old"),
        "new repel s=300 clip": dict(clip=True, mode="repel", scale=300.0, alpha=0.5),
        "new entropy s=1000 a=0.3 clip": dict(clip=True, mode="entropy", scale=1000.0, alpha=0.3),
        "new repel s=1000 noclip": dict(clip=False, mode="repel", scale=1000.0, alpha=0.5),
    }.items():
        rows[name] = _rates(setup, **kw)
    print(f"plain DDIM copies of P: {plain:.3f}")
    for name, (p, r) in rows.items():
        print(f"{name}: copies of P {p:.3f}, copies of A\\P {r:.3f}")
    assert plain >= 0.15  # the memoriser copies P without protection
    # the diagnosis: the pre-fix step attracts copies of P when the clip bites
    assert rows["old repel s=300 clip"][0] >= 2 * plain
    # the clip-consistent step no longer sends every sample to P: a strong always-on repel
    # roughly randomises the endpoint (chance = |P|/|A| = 1/3; measured 0.313 at s=300, but
    # 0.393 at s=1000: the clip cuts the shift asymmetrically, so it is not protection either)
    assert rows["new repel s=300 clip"][0] <= 1 / 3 + 0.05
    # a gated entropy setting protects with the clip on (measured: 0.147 vs 0.253, a 42% cut);
    # without clipping repel s=1000 cuts ~79% (0.053 vs 0.253)
    assert rows["new entropy s=1000 a=0.3 clip"][0] <= 0.7 * plain
    assert rows["new repel s=1000 noclip"][0] <= 0.25 * plain
    for name, (p, r) in rows.items():
        if not name.startswith("old"):
            assert p + r >= 0.95, name  # samples stay copies of A (data-like)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 8 target not met by the clip-consistent rule, measured (N=150, seed 1, plain "
    "DDIM 0.253 copies of P): with clip_sample=True the best settings found cut copies of P by "
    "42% (entropy s=1000 a=0.3: 0.147), 63% (entropy s=10000 a=0.3 or a=0.2), 66% (entropy "
    "s=30000 a=0.3: 0.087), not 80%; use_clipped_model_output gives the same numbers. The clip "
    "bounds the guidance's shift of x0_hat, so its leverage on x_t' is at most "
    "2(sp - d*sa/s1) per pixel; without clipping repel s=1000 cuts 79%",
)
def test_subset_protection_cuts_80_percent_with_clip(setup):
    plain = _rates(setup, clip=True, mode="repel", scale=0.0, alpha=0.5)[0]
    best = _rates(setup, clip=True, mode="entropy", scale=1000.0, alpha=0.3)[0]
    assert best <= 0.2 * plain
