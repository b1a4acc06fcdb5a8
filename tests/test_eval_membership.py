"""Membership attack: z test, ROC, the ε̂ denoiser against autograd of the mode objective."""

import math

import pytest
import torch
from PIL import Image
from scipy.stats import norm

from cpsample_fast.eval import membership_inference, z_test
from cpsample_fast.eval.membership import denoiser_output, roc, save_roc
from cpsample_fast.models import EmpiricalDenoiser
from cpsample_fast.schedule import NoiseSchedule


class TinyProtector(torch.nn.Module):
    """A per-sample linear classifier with a time term (no batch mixing)."""

    def __init__(self, d):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(d))

    def forward(self, x, t):
        return 3.0 * x.flatten(1) @ self.w + t.float() / 1000


def test_z_test_and_roc():
    torch.manual_seed(0)
    m, n = torch.randn(40) - 1.0, torch.randn(53)
    z, p = z_test(m, n)
    se = math.sqrt(m.double().var() / 40 + n.double().var() / 53)
    want = float(n.double().mean() - m.double().mean()) / se
    print("z", z, "want", want, "p", p)
    assert z == pytest.approx(want, rel=1e-9)
    assert p == pytest.approx(norm.sf(want), rel=1e-6)
    _, _, auc, tpr = roc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0, 4.0]))
    assert auc == 1.0 and tpr == 1.0
    _, _, auc, _ = roc(torch.tensor([5.0, 6.0]), torch.tensor([2.0, 3.0]))
    assert auc == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        z_test(torch.ones(1), torch.ones(5))


@pytest.mark.parametrize("mode", ["repel", "attract", "entropy"])
def test_eps_hat_matches_autograd_of_objective(mode):
    s = NoiseSchedule()
    torch.manual_seed(2)
    images = torch.rand(5, 1, 3, 3) * 2 - 1
    eps_model = EmpiricalDenoiser(images, s)
    prot = TinyProtector(9)
    x = torch.randn(3, 1, 3, 3)
    t = torch.full((3,), 300, dtype=torch.long)
    scale, alpha = 7.0, 0.5
    got = denoiser_output(eps_model, x, t, s, protector=prot, scale=scale, alpha=alpha, mode=mode)
    # Independent form: gradient of the mode's objective (docs/ALGORITHM.md §3 step 4).
    xr = x.clone().requires_grad_(True)
    f = prot(xr, t)
    r = torch.sigmoid(f)
    ls = torch.nn.functional.logsigmoid
    obj = {
        "repel": ls(f.abs()),
        "attract": -ls(-f.abs()),
        "entropy": r * r.log() + (1 - r) * (1 - r).log(),
    }[mode]
    (g,) = torch.autograd.grad(obj.sum(), xr)
    m = (torch.sigmoid(-f.abs()) < alpha).float()[:, None, None, None]
    s1 = (1 - s.alphas_cumprod[300]).sqrt()
    want = eps_model(x, t) + scale * s1 * m * g
    err = (got - want).abs().max().item()
    print(mode, "max error:", err, "gate", m.flatten())
    assert err < 1e-4
    plain = denoiser_output(eps_model, x, t, s)
    assert torch.equal(plain, eps_model(x, t))


def test_attack_separates_members_of_empirical_denoiser(tmp_path):
    s = NoiseSchedule()
    torch.manual_seed(0)
    members, nonmembers = torch.rand(9, 1, 4, 4) * 2 - 1, torch.rand(7, 1, 4, 4) * 2 - 1
    model = EmpiricalDenoiser(members, s)
    r = membership_inference(model, members, nonmembers, s, timesteps=(50, 150), batch_size=4)
    print(r.to_dict())
    assert r.threat_model == "eps" and "white-box" in r.threat_model_text
    assert r.auc == 1.0 and r.z > 3 and r.p_value < 1e-3
    assert len(r.per_timestep) == 2
    prot = TinyProtector(16)
    rh = membership_inference(
        model, members, nonmembers, s, timesteps=(50,), protector=prot, scale=10.0, alpha=0.5
    )
    assert rh.threat_model == "eps_hat" and rh.params["scale"] == 10.0
    save_roc([r, rh], tmp_path / "roc.png")
    assert Image.open(tmp_path / "roc.png").size[0] > 50


def test_batch_size_does_not_change_scores():
    s = NoiseSchedule()
    torch.manual_seed(0)
    imgs = torch.rand(5, 1, 4, 4) * 2 - 1
    model = EmpiricalDenoiser(imgs[:3], s)
    from cpsample_fast.eval import reconstruction_errors

    a = reconstruction_errors(model, imgs, s, timesteps=(10, 400), batch_size=5)
    b = reconstruction_errors(model, imgs, s, timesteps=(10, 400), batch_size=2)
    assert a.shape == (5, 2)
    assert (a - b).abs().max() < 1e-6


def test_scores_do_not_depend_on_set_size_or_batch():
    """Image i's noise is a function of (seed, i, k, r) alone: a prefix scores as in the set."""
    from cpsample_fast.constants import STREAM_MEMBERSHIP
    from cpsample_fast.eval import reconstruction_errors
    from cpsample_fast.noise import philox_normal

    s = NoiseSchedule()
    torch.manual_seed(0)
    # 3×3 images: 9 values, not a multiple of torch's 16-wide CPU normal fill, so one
    # randn over the whole set would give a prefix other noise than a randn over the prefix.
    imgs = torch.rand(9, 1, 3, 3) * 2 - 1
    model = EmpiricalDenoiser(imgs[:4], s)
    kw = dict(timesteps=(10, 400), n_noise=2, seed=5)
    full = reconstruction_errors(model, imgs, s, batch_size=4, **kw)
    for n, bs in ((5, 5), (5, 3), (1, 1), (7, 128)):
        part = reconstruction_errors(model, imgs[:n], s, batch_size=bs, **kw)
        err = (part - full[:n]).abs().max().item()
        print(f"first {n} images, batch {bs}: max |subset - full| = {err}")
        assert err == 0.0
    # The draws are the documented counter-based ones: recompute image 6's error by hand.
    i, k, r, t = 6, 1, 1, 400
    e = philox_normal(5, torch.tensor([i]), k * 2 + r, STREAM_MEMBERSHIP, (1, 3, 3))
    e0 = philox_normal(5, torch.tensor([i]), k * 2, STREAM_MEMBERSHIP, (1, 3, 3))
    a = s.alphas_cumprod[t]
    tt = torch.tensor([t])
    errs = [
        (z - model(a.sqrt() * imgs[i : i + 1] + (1 - a).sqrt() * z, tt)).pow(2).mean()
        for z in (e0, e)
    ]
    want = sum(errs).item() / 2
    print("hand-computed error of image 6 at t=400:", want, "vs", full[i, k].item())
    assert abs(want - full[i, k].item()) < 1e-6
    # Different seeds give different noise (members and non-members use seed and seed + 1000003).
    other = reconstruction_errors(model, imgs, s, batch_size=4, **dict(kw, seed=6))
    assert (other - full).abs().max() > 1e-4


def test_bad_input():
    s = NoiseSchedule()
    model = EmpiricalDenoiser(torch.zeros(2, 1, 4, 4), s)
    ok = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match="same image shape|share the image shape"):
        membership_inference(model, ok, torch.zeros(3, 1, 4, 5), s)
    with pytest.raises(ValueError, match="members is empty"):
        membership_inference(model, torch.zeros(0, 1, 4, 4), ok, s)
    with pytest.raises(ValueError, match="timesteps"):
        membership_inference(model, ok, ok, s, timesteps=(1000,))
    with pytest.raises(ValueError, match="alpha"):
        membership_inference(model, ok, ok, s, protector=TinyProtector(16), scale=1.0, alpha=0.9)
    bad = ok.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        membership_inference(model, ok, bad, s)


def test_guidance_range_switches_guidance_off_outside():
    s = NoiseSchedule()
    torch.manual_seed(3)
    eps_model = EmpiricalDenoiser(torch.rand(4, 1, 3, 3) * 2 - 1, s)
    prot = TinyProtector(9)
    x = torch.randn(3, 1, 3, 3)
    t = torch.tensor([100, 300, 500])
    kw = dict(protector=prot, scale=5.0, alpha=0.5)
    full = denoiser_output(eps_model, x, t, s, **kw)
    part = denoiser_output(eps_model, x, t, s, guidance_range=(200, 400), **kw)
    plain = eps_model(x, t)
    err = (part[1] - full[1]).abs().max().item()
    print("inside-range max error:", err)
    assert err < 1e-6
    assert torch.equal(part[[0, 2]], plain[[0, 2]])
    assert not torch.allclose(full[0], plain[0])


class MemberProtector(torch.nn.Module):
    """Confident (|f| ≈ 6) next to the members only: guidance acts on members alone."""

    def __init__(self, members):
        super().__init__()
        self.register_buffer("m", members.flatten(1))

    def forward(self, x, t):
        d2 = torch.cdist(x.flatten(1), self.m).pow(2).min(1).values
        return 6.0 * torch.exp(-d2 / 4.0)


def _protected_scores_by_hand(model, prot, images, s, t, scale, alpha, seed):
    """ε̂ reconstruction error of each image at one timestep, from the mode objective's
    autograd gradient (repel: ∇ log q) and the documented Philox draws: independent of
    denoiser_output and reconstruction_errors."""
    from cpsample_fast.constants import STREAM_MEMBERSHIP
    from cpsample_fast.noise import philox_normal

    a = s.alphas_cumprod[t]
    out = []
    for i in range(images.shape[0]):
        e = philox_normal(seed, torch.tensor([i]), 0, STREAM_MEMBERSHIP, images.shape[1:])
        xt = (a.sqrt() * images[i : i + 1] + (1 - a).sqrt() * e).requires_grad_(True)
        tt = torch.tensor([t])
        f = prot(xt, tt)
        (g,) = torch.autograd.grad(torch.nn.functional.logsigmoid(f.abs()).sum(), xt)
        m = float(torch.sigmoid(-f.abs()) < alpha)  # the gate, per image
        eps_hat = model(xt.detach(), tt) + scale * (1 - a).sqrt() * m * g
        out.append((e - eps_hat).pow(2).mean().item())
    return torch.tensor(out, dtype=torch.float64)


def test_protected_attack_values_and_two_sided_strength():
    """The ε̂ attack's scores, z, AUC and two-sided figures checked by value against a
    hand computation — including a case where guidance flips the leak (AUC < 0.5)."""
    from sklearn.metrics import roc_auc_score

    from cpsample_fast.eval.membership import two_sided

    s = NoiseSchedule()
    torch.manual_seed(0)
    members, nonmembers = torch.rand(9, 1, 4, 4) * 2 - 1, torch.rand(7, 1, 4, 4) * 2 - 1
    model = EmpiricalDenoiser(members, s)
    for prot, scale, alpha in (
        (TinyProtector(16), 10.0, 0.5),
        (MemberProtector(members), 1e5, 0.1),
    ):
        r = membership_inference(
            model, members, nonmembers, s, timesteps=(50,), protector=prot, scale=scale,
            alpha=alpha, seed=3,
        )  # fmt: skip
        em = _protected_scores_by_hand(model, prot, members, s, 50, scale, alpha, 3)
        en = _protected_scores_by_hand(model, prot, nonmembers, s, 50, scale, alpha, 3 + 1_000_003)
        assert torch.allclose(r.member_scores.double(), em, rtol=1e-4, atol=1e-6)
        assert torch.allclose(r.nonmember_scores.double(), en, rtol=1e-4, atol=1e-6)
        se = math.sqrt(em.var() / 9 + en.var() / 7)
        z = float(en.mean() - em.mean()) / se
        auc = roc_auc_score([1] * 9 + [0] * 7, torch.cat([-em, -en]).numpy())
        print(f"scale {scale}: z {r.z:.3f} (hand {z:.3f}), AUC {r.auc:.3f} (hand {auc:.3f})")
        assert r.z == pytest.approx(z, rel=1e-3, abs=1e-3)
        assert r.auc == pytest.approx(auc, abs=1e-9)
        assert r.auc_two_sided == pytest.approx(max(auc, 1 - auc), abs=1e-9)
        assert r.abs_z == pytest.approx(abs(z), rel=1e-3, abs=1e-3)
        d = r.to_dict()
        assert d["two_sided"]["auc"] == r.auc_two_sided and d["two_sided"]["abs_z"] == r.abs_z
        assert d["two_sided"]["direction"] == ("members lower" if auc > 0.5 else "members higher")
        assert d["per_timestep"][0]["auc_two_sided"] == pytest.approx(r.auc_two_sided)
    # Strong guidance makes members reconstruct worse here: the one-sided AUC falls below 0.5
    # and the two-sided figure reports the leak anyway.
    assert r.auc < 0.5 and r.auc_two_sided > 0.5 and r.direction == "members higher"
    assert two_sided(0.3, -2.0) == {"auc": 0.7, "abs_z": 2.0, "direction": "members higher"}
    assert two_sided(0.5, 0.0)["direction"] == "none"
