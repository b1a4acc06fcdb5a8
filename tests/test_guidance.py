"""``cpsample_fast.guidance`` against closed-form values (docs/ALGORITHM.md §3 steps 2–5).

Every expected value is computed here in Python ``math`` (float64) from the formulas, never by
calling the module under test: the confidence ``q = max(r, 1 - r)``, the gate
``m = 1[min(r, 1 - r) < α]``, the mode weight ``w(f)`` and the VJP seed
``c = s·√(1-ᾱ_t)·m·w(f)·sign(f)``. The same table checks the ``cpsample::guidance_seed`` op for
every backend in tests/test_ops.py, so a backend cannot agree with the torch version by
sharing its code.
"""

from __future__ import annotations

import math

import pytest
import torch

from cpsample_fast import guidance

ALPHA_PAPER = 0.001
# The gate opens where sigmoid(-|f|) < α, i.e. |f| > log(1/α - 1) (≈ 6.9068 at α = 0.001).
EDGE_PAPER = math.log(1.0 / ALPHA_PAPER - 1.0)

# Logits of both signs, 0, each side of the α = 0.001 edge, and saturated values.
LOGITS = [-40.0, -EDGE_PAPER - 0.01, -EDGE_PAPER + 0.01, -3.0, -0.3, 0.0, 0.2, 2.5,
          EDGE_PAPER - 0.01, EDGE_PAPER + 0.01, 9.0, 25.0]  # fmt: skip


def gate_errors_in_edge_units(f: torch.Tensor, gate: torch.Tensor, alpha: float) -> float:
    """The widest gate decision that disagrees with the exact (float64) one, as the distance of
    its |f| from the edge ``log(1/α - 1)`` in units of ``eps32/(1 - α)`` (0 when all agree).

    A float32 ``sigmoid(-|f|)`` with relative error ``k·eps`` can only flip decisions within
    ``k·eps/(1 - α)`` of the edge (d sigmoid(-a)/da = -s(1 - s)): an accurate sigmoid stays
    within a few units, an approximate exp2 with a full-speed division does not.
    """
    edge = math.log(1.0 / alpha - 1.0)
    exact = torch.sigmoid(-f.double().abs()) < alpha
    wrong = gate.cpu() != exact.cpu()
    if not wrong.any():
        return 0.0
    unit = torch.finfo(torch.float32).eps / (1.0 - alpha)
    return ((f.double().abs().cpu()[wrong] - edge).abs() / unit).max().item()


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def closed_form(f: float, scale: float, alpha: float, mode: str) -> tuple[float, float, bool]:
    """``(c, q, m)`` of one logit in float64, written from the formulas (not from guidance.py).

    repel ``g = ∇ log q``, attract ``g = -∇ log(1 - q)``, entropy ``g = -∇H(r)``; by the chain
    rule through ``f``: ``w = 1 - q``, ``w = q`` and ``w = |f|·r·(1 - r)``, each times
    ``sign(f)·∇f``.
    """
    r = _sigmoid(f)
    q = max(r, 1.0 - r)
    small = _sigmoid(-abs(f))  # min(r, 1 - r) without the cancellation of 1 - r
    m = small < alpha
    w = {"repel": small, "attract": q, "entropy": abs(f) * r * (1.0 - r)}[mode]
    sign = (f > 0) - (f < 0)
    return scale * m * w * sign, q, m


def closed_form_table(logits, scale: float, alpha: float, mode: str):
    """``(c, q, m)`` tensors (float64, float64, bool) for a list of logits."""
    rows = [closed_form(float(f), scale, alpha, mode) for f in logits]
    c = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    q = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    m = torch.tensor([r[2] for r in rows], dtype=torch.bool)
    return c, q, m


def assert_matches_closed_form(c, q, m, logits, scale, alpha, mode):
    """The op/function output against :func:`closed_form` with float32 tolerances."""
    f32 = torch.tensor(logits, dtype=torch.float32).double().tolist()  # the values it saw
    c_ref, q_ref, m_ref = closed_form_table(f32, scale, alpha, mode)
    eps = torch.finfo(torch.float32).eps
    # float32 sigmoid/exp: a few ulp relative on c. Entropy's r·(1 - r) is evaluated as written:
    # 1 - r carries r's rounding (eps/2 absolute), so its weight |f|·r·(1 - r) is good to
    # |f|·eps absolute (it cancels entirely for |f| ≳ 17, where the weight is < |f|·4e-8).
    tol = 8 * eps * c_ref.abs()
    if mode == "entropy":
        tol = tol + 2 * eps * scale * torch.tensor(f32, dtype=torch.float64).abs()
    tol = tol.clamp_min(1e-300)
    err_c = ((c.double() - c_ref).abs() / tol).max().item()
    err_q = (q.double() - q_ref).abs().max().item()
    print(f"{mode} α={alpha}: max err c / tolerance {err_c:.2e}, max abs err q {err_q:.2e}, "
          f"gate open {int(m.sum())} of {m.numel()}")  # fmt: skip
    assert m.dtype == torch.bool and c.dtype == torch.float32
    assert m.tolist() == m_ref.tolist()
    assert err_c <= 1.0
    assert err_q <= 4 * eps  # q ∈ [0.5, 1]: a few ulp absolute
    assert (c[c_ref == 0] == 0).all()  # shut gates (and f = 0) give exactly no guidance
    nonzero = c != 0
    assert torch.equal(torch.sign(c[nonzero]).double(), torch.sign(c_ref[nonzero]))
    assert nonzero.any()


@pytest.mark.parametrize("mode", guidance.MODES)
@pytest.mark.parametrize("alpha", [ALPHA_PAPER, 0.05, 0.5])
def test_guidance_seed_matches_closed_form(mode, alpha):
    scale = 1000.0 * 0.6  # s·√(1-ᾱ_t) at the paper's s = 1000
    c, q, m = guidance.vjp_seed(torch.tensor(LOGITS), torch.tensor(scale), alpha, mode)
    assert_matches_closed_form(c, q, m, LOGITS, scale, alpha, mode)
    # Some samples guided and some not in every case: the gate really selects.
    assert m.any() and not m.all()


def test_gate_both_sides_of_the_paper_alpha():
    """α = 0.001: |f| just below log(999) stays shut, just above opens, for both signs."""
    below, above = EDGE_PAPER - 1e-3, EDGE_PAPER + 1e-3
    f = torch.tensor([below, -below, above, -above, 0.0, 12.0], dtype=torch.float32)
    m = guidance.gate(f, ALPHA_PAPER)
    print("edge", EDGE_PAPER, "gate", m.tolist())
    assert m.tolist() == [False, False, True, True, False, True]
    # The seed is exactly 0 where the gate is shut and nonzero where it is open.
    for mode in guidance.MODES:
        c, _, _ = guidance.vjp_seed(f, torch.tensor(3.0), ALPHA_PAPER, mode)
        assert (c != 0).tolist() == [False, False, True, True, False, True], mode


def test_gate_at_alpha_one_half_opens_for_every_nonzero_logit():
    f = torch.tensor([-1e-3, 1e-3, 0.0, 7.0])
    assert guidance.gate(f, 0.5).tolist() == [True, True, False, True]


@pytest.mark.parametrize("mode", guidance.MODES)
def test_mode_weight_and_confidence_closed_form(mode):
    f = torch.tensor(LOGITS, dtype=torch.float64)
    w = guidance.mode_weight(f, mode)
    q = guidance.confidence(f)
    for fi, wi, qi in zip(LOGITS, w.tolist(), q.tolist()):
        big, small = _sigmoid(abs(fi)), _sigmoid(-abs(fi))  # max/min(r, 1 - r), uncancelled
        expect = {"repel": small, "attract": big, "entropy": abs(fi) * big * small}[mode]
        # float64 entropy evaluates 1 - r as written: ~1e-16 absolute
        assert wi == pytest.approx(expect, rel=1e-12, abs=4e-16 * abs(fi)), (mode, fi)
        assert qi == pytest.approx(big, rel=1e-12), fi
        assert wi >= 0.0


@pytest.mark.parametrize("mode", guidance.MODES)
def test_seed_is_the_derivative_of_the_mode_objective(mode):
    """``w(f)·sign(f) = d/df`` of the objective whose x-gradient is the guidance (repel:
    ``log q``, attract: ``-log(1 - q)``, entropy: ``-H(r)``), by autograd in float64."""
    # |f| <= 12: beyond that float64 autograd of r·(1 - r) cancels to ~1e-5 relative
    f32 = torch.tensor([v for v in LOGITS if 0.0 < abs(v) <= 12.0], dtype=torch.float32)
    f = f32.double().requires_grad_(True)  # the float32 values the seed sees, in float64
    r = torch.sigmoid(f)
    q = torch.maximum(r, 1 - r)
    objective = {
        "repel": torch.log(q),
        "attract": -torch.log(1 - q),
        "entropy": r * torch.log(r) + (1 - r) * torch.log(1 - r),
    }[mode]
    (d,) = torch.autograd.grad(objective.sum(), f)
    c, _, _ = guidance.vjp_seed(f.detach(), 1.0, 0.5, mode)
    tol = 1e-6 * d.abs()
    if mode == "entropy":  # float32 r·(1 - r): |f|·eps absolute (see assert_matches_closed_form)
        tol = tol + 2 * torch.finfo(torch.float32).eps * f.detach().abs()
    err = ((c.double() - d).abs() / tol).max().item()
    print(f"{mode}: seed vs d objective/df, max err / tolerance {err:.2e}")
    assert err <= 1.0


def test_mode_id_and_alpha_checks():
    assert [guidance.mode_id(m) for m in guidance.MODES] == [0, 1, 2]
    with pytest.raises(ValueError, match="mode"):
        guidance.mode_id("push")
    with pytest.raises(ValueError, match="mode"):
        guidance.mode_weight(torch.zeros(2), "push")
    for bad in (0.0, -0.1, 0.51):
        with pytest.raises(ValueError, match="alpha"):
            guidance.check_alpha(bad)
    assert guidance.check_alpha(0.5) == 0.5
