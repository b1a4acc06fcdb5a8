"""Hold-out images trained toward 1/2 make the protector uncertain on non-members
(docs/ALGORITHM.md §2)."""

import pytest
import torch

from cpsample_fast.data import load_digits
from cpsample_fast.protector import train_protector
from cpsample_fast.protector.report import evaluate_protector
from cpsample_fast.schedule import NoiseSchedule

LOW_T = [0, 250]


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    members, holdout = load_digits(32, size=8), load_digits(128, size=8, offset=32)
    common = {
        "schedule": NoiseSchedule(),
        "protector": {"base_channels": 16},
        "t_range": LOW_T,
        "steps": 300,
        "batch_size": 32,
        "lr": 5e-3,
        "progress": False,
        "report_bins": 4,
    }
    plain = train_protector(members, **common)
    guarded = train_protector(members, holdout=holdout, holdout_batch_size=32, **common)
    return members, plain, guarded


def test_holdout_moves_non_member_confidence_toward_half(runs):
    members, (plain, plain_report), (guarded, guarded_report) = runs
    ac = NoiseSchedule().alphas_cumprod
    unseen = load_digits(64, size=8, offset=200)  # neither members nor hold-out
    q = {}
    for name, net in (("plain", plain), ("holdout", guarded)):
        ev = [evaluate_protector(net, unseen, None, ac, LOW_T, seed=s) for s in range(3)]
        mem = [evaluate_protector(net, members, None, ac, LOW_T, seed=s) for s in range(3)]
        q[name] = sum(e["confidence"][0] for e in ev) / 3
        q[name + "_members"] = sum(e["confidence"][0] for e in mem) / 3
    print("non-member mean confidence q, t in [0, 250):", q)
    print("member accuracy per bin, plain:", plain_report.member["accuracy"])
    print("member accuracy per bin, holdout:", guarded_report.member["accuracy"])
    print("hold-out confidence per bin:", guarded_report.holdout["confidence"])
    assert q["holdout"] - 0.5 < 0.6 * (q["plain"] - 0.5)  # measured 0.845 -> 0.654
    assert guarded_report.holdout is not None and plain_report.holdout is None
    assert guarded_report.training["holdout_count"] == 128
    # Members are still memorised at the least noisy timesteps.
    assert guarded_report.member["accuracy"][0] >= 0.9
