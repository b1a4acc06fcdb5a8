"""``eval.audit``: the audits the demo and ``cpsample evaluate`` share are the metrics' own."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from cpsample_fast.eval import blurred_replication, membership_inference, replication
from cpsample_fast.eval.audit import membership_attacks, rejection_audit, replication_audit
from cpsample_fast.models import EmpiricalDenoiser
from cpsample_fast.schedule import NoiseSchedule


def _images(n, seed):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_replication_audit_is_plain_and_blurred_replication():
    train, gen = _images(6, 0), torch.cat([_images(6, 0)[:2], _images(3, 1)])
    rep, blurred = replication_audit(gen, train, thresholds=(0.9,), blur_sigma=1.0)
    assert rep.to_dict() == replication(gen, train, thresholds=(0.9,)).to_dict()
    want = blurred_replication(gen, train, sigma=1.0, thresholds=(0.9,))
    assert blurred.to_dict() == want.to_dict()
    assert abs(rep.rates[0.9] - 2 / 5) < 1e-6
    assert replication_audit(gen, train, thresholds=(0.9,), blur_sigma=0)[1] is None


def test_membership_attacks_are_eps_then_eps_hat():
    members, non = _images(4, 2), _images(4, 3)
    schedule = NoiseSchedule()
    model = EmpiricalDenoiser(members, schedule)
    kw = dict(timesteps=[100])
    assert len(membership_attacks(model, members, non, schedule, **kw)) == 1

    def protector(x, t):
        return x.flatten(1).sum(1)

    guidance = dict(scale=5.0, alpha=0.3, mode="repel")
    eps, hat = membership_attacks(model, members, non, schedule, protector=protector, **kw,
                                  **guidance)  # fmt: skip
    want_eps = membership_inference(model, members, non, schedule, **kw)
    want_hat = membership_inference(model, members, non, schedule, protector=protector, **kw,
                                    **guidance)  # fmt: skip
    assert eps.to_dict() == want_eps.to_dict() and hat.to_dict() == want_hat.to_dict()
    assert (eps.threat_model, hat.threat_model) == ("eps", "eps_hat")


def test_rejection_audit_scores_only_what_was_kept():
    train = _images(5, 4)
    kept = SimpleNamespace(n_accepted=3, samples=train[:3], to_dict=lambda: {"n_accepted": 3})
    rd = rejection_audit(kept, train, thresholds=(0.99,), blur_sigma=1.0, reference=_images(6, 5),
                         features="pixels")  # fmt: skip
    assert rd["replication"]["replication_rate"]["0.99"] == 1.0
    assert "replication_blurred" in rd and rd["quality"]["feature_space"] == "pixels"
    assert "eps applies" in rd["membership_note"]
    none = SimpleNamespace(n_accepted=0, samples=train[:0], to_dict=lambda: {"n_accepted": 0})
    rd = rejection_audit(none, train, thresholds=(0.99,), blur_sigma=1.0)
    assert set(rd) == {"n_accepted", "membership_note"}
