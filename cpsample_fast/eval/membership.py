"""Membership inference: Matsumoto et al.'s reconstruction-error attack (docs/ALGORITHM.md §6).

Score of an image ``x`` at timestep ``t``: ``‖ε - D(√ᾱ_t x + √(1-ᾱ_t) ε, t)‖²`` (mean over pixels
and over the chosen timesteps and noise draws), where ``D`` is either the plain denoiser ε or the
CPSample denoiser ``ε̂ = ε + s·√(1-ᾱ_t)·m·g`` (same protector, α, s and mode as sampling;
docs/ALGORITHM.md §3 steps 2–5). Members of an overfitted model reconstruct better (lower score).
The statistics are the paper's Table 3 form — a one-sided two-sample z test of "members have
lower error" — plus ROC AUC and the TPR at 1% FPR.

Headline strength, two-sided: ``max(AUC, 1 − AUC)`` and ``|z|``. A denoiser (e.g. CPSample's ε̂
with strong guidance) can make members reconstruct *worse* than non-members; the one-sided test
then reports "no leak" (AUC < 0.5, z < 0) while an attacker who flips the score separates them
just as well. ``MembershipResult.auc_two_sided`` / ``abs_z`` / ``direction`` report that.

Threat models (every result names its own):

- ``"eps"``: white-box access to the raw denoiser ε(x_t, t) (weights or a query oracle at chosen
  t); the attacker knows the noise schedule and holds the candidate images.
- ``"eps_hat"``: access only to the deployed CPSample denoiser ε̂ (the protector and its guidance
  are applied inside the oracle, with the sampling α, s and mode); same attacker knowledge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..constants import STREAM_MEMBERSHIP
from ..guidance import check_alpha, mode_id, vjp_seed
from ..noise import philox_normal
from ..schedule import alphas_cumprod_of, forward_noise
from ..validation import check_int
from .inputs import image_pair
from .replication import as_image_batch

# The attack's noise uses its own Philox stream (constants.STREAM_MEMBERSHIP), disjoint from the
# sampler's, so attack draws never coincide with sampling draws.

THREAT_MODELS = {
    "eps": (
        "white-box access to the raw denoiser eps(x_t, t) at attacker-chosen t; attacker knows "
        "the noise schedule and holds the candidate images (Matsumoto et al. 2023)"
    ),
    "eps_hat": (
        "query access to the deployed CPSample denoiser eps_hat(x_t, t) = eps + "
        "s*sqrt(1-abar_t)*m*g (protector applied inside, sampling alpha/s/mode); attacker knows "
        "the noise schedule and holds the candidate images, no access to the raw eps"
    ),
}


def _to_epsilon(o, x, sa, s1, prediction_type: str):
    if prediction_type == "epsilon":
        return o
    if prediction_type == "sample":
        return (x - sa * o) / s1
    if prediction_type == "v_prediction":
        return sa * o + s1 * x
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def denoiser_output(
    eps_model: nn.Module,
    x_t: torch.Tensor,  # [B, C, H, W]
    t: torch.Tensor,  # int64 [B]
    schedule,
    *,
    protector: nn.Module | None = None,
    scale: float = 0.0,
    alpha: float = 0.5,
    mode: str = "repel",
    guidance_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """ε (no protector or ``scale = 0``) or the CPSample ε̂ at ``(x_t, t)`` ``[B, C, H, W]``.

    ε̂ = ε + G with G the VJP of the protector's logits with the seed of
    :func:`cpsample_fast.guidance.vjp_seed` (docs/ALGORITHM.md §3 step 5). With
    ``guidance_range`` (inclusive ``(t_min, t_max)``, as ``CPSampler``'s), samples whose t lies
    outside get ε.
    """
    ac = alphas_cumprod_of(schedule).to(x_t.device)
    a = ac[t][:, None, None, None]
    sa, s1 = a.sqrt(), (1 - a).sqrt()
    ptype = getattr(schedule, "prediction_type", "epsilon")
    with torch.no_grad():
        eps = _to_epsilon(eps_model(x_t, t), x_t, sa, s1, ptype).float()
    if protector is None or scale == 0:
        return eps
    x = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = protector(x, t).float()  # [B]
        # One seed per sample; t is shared within a call, so s·√(1-ᾱ_t) is that of t[0]. Calls
        # with mixed t pass a per-sample scale (broadcasts the same way).
        scale_t = float(scale) * s1.flatten()
        c, _, _ = vjp_seed(logits.detach(), scale_t, alpha, mode)
        if guidance_range is not None:
            c = c * ((t >= guidance_range[0]) & (t <= guidance_range[1])).to(c.dtype)
        (g,) = torch.autograd.grad(logits, x, grad_outputs=c)
    return eps + g.float()


def reconstruction_errors(
    eps_model: nn.Module,
    images,  # [N, C, H, W]
    schedule,
    *,
    timesteps: Sequence[int] = (100,),
    n_noise: int = 1,
    seed: int = 0,
    batch_size: int = 128,
    protector: nn.Module | None = None,
    scale: float = 0.0,
    alpha: float = 0.5,
    mode: str = "repel",
    guidance_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-image reconstruction errors ``[N, len(timesteps)]`` (mean over pixels and draws).

    Noise for image ``i``, timestep index ``k``, draw ``r`` is a pure function of
    ``(seed, i, k, r)``: the counter-based ``philox_normal(seed, i, step=k·n_noise + r,
    stream=STREAM_MEMBERSHIP)``. An image's score therefore does not depend on the batch size,
    the set size or the device; a prefix of a set scores as it does inside the whole set.

    Args:
        eps_model: the ε-model ``(x, t) -> [B, C, H, W]``.
        images: ``[N, C, H, W]`` in [-1, 1].
        schedule: ``NoiseSchedule`` (or ``alphas_cumprod``).
        timesteps: training-schedule timesteps.
        n_noise: noise draws per image and timestep.
        seed: Philox key of the noise.
        batch_size: images per model call.
        protector, scale, alpha, mode, guidance_range: as :func:`denoiser_output`.

    Returns:
        float32 ``[N, len(timesteps)]``.
    """
    x = as_image_batch(images, "images")
    ac = alphas_cumprod_of(schedule)
    T = ac.shape[0]
    ts = [int(t) for t in timesteps]
    if not ts or any(not 0 <= t < T for t in ts):
        raise ValueError(f"timesteps must be a non-empty list in [0, {T - 1}], got {list(ts)}")
    check_int("n_noise", n_noise)
    check_int("batch_size", batch_size)
    if protector is not None and scale:
        check_alpha(alpha)
        mode_id(mode)
    device = next(iter(eps_model.parameters()), torch.empty(0)).device
    out = torch.zeros(x.shape[0], len(ts))
    for k, t in enumerate(ts):
        for r in range(n_noise):
            for s in range(0, x.shape[0], batch_size):
                x0 = x[s : s + batch_size].to(device)
                idx = torch.arange(s, s + x0.shape[0], dtype=torch.int64, device=device)  # [B]
                e = philox_normal(seed, idx, k * n_noise + r, STREAM_MEMBERSHIP, x.shape[1:])
                tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
                xt = forward_noise(x0, e, tt, ac)
                d = denoiser_output(
                    eps_model,
                    xt,
                    tt,
                    schedule,
                    protector=protector,
                    scale=scale,
                    alpha=alpha,
                    mode=mode,
                    guidance_range=guidance_range,
                )
                out[s : s + batch_size, k] += (e - d).pow(2).flatten(1).mean(1).cpu() / n_noise
    return out


def z_test(member: torch.Tensor, nonmember: torch.Tensor) -> tuple[float, float]:
    """One-sided two-sample z test that members have the lower mean score.

    ``z = (mean_non - mean_mem) / sqrt(var_mem/n_mem + var_non/n_non)``, ``p = Φ(-z)``
    (the CPSample paper's Table 3 form). Returns ``(z, p)``.
    """
    m, n = member.double(), nonmember.double()
    if m.numel() < 2 or n.numel() < 2:
        raise ValueError("the z test needs at least 2 members and 2 non-members")
    se = math.sqrt(float(m.var()) / m.numel() + float(n.var()) / n.numel())
    diff = float(n.mean() - m.mean())
    z = diff / se if se > 0 else (math.inf if diff > 0 else -math.inf if diff < 0 else 0.0)
    p = 0.5 * math.erfc(z / math.sqrt(2.0))
    return z, p


def two_sided(auc: float, z: float) -> dict:
    """The attack's strength whichever way round it separates: ``max(AUC, 1 − AUC)``, ``|z|``.

    ``direction`` says which way: ``"members lower"`` (the usual leak: members reconstruct
    better), ``"members higher"`` (flipped: the score still leaks membership) or ``"none"``.
    """
    direction = "members lower" if auc > 0.5 else "members higher" if auc < 0.5 else "none"
    return {"auc": max(auc, 1.0 - auc), "abs_z": abs(z), "direction": direction}


def roc(
    member: torch.Tensor, nonmember: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """ROC of the attack "member if score ≤ threshold".

    Returns:
        ``(fpr, tpr, auc, tpr_at_1pct_fpr)``; AUC counts ties as one half; TPR at 1% FPR is the
        largest TPR whose FPR ≤ 0.01 (no interpolation, the conservative reading).
    """
    s = torch.cat([-member.double(), -nonmember.double()]).numpy()
    y = np.concatenate([np.ones(member.numel()), np.zeros(nonmember.numel())])
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, s)
    auc = float(roc_auc_score(y, s))
    ok = fpr <= 0.01 + 1e-12
    return fpr, tpr, auc, float(tpr[ok].max()) if ok.any() else 0.0


@dataclass
class MembershipResult:
    """One attack's outcome.

    Attributes:
        threat_model: ``"eps"`` or ``"eps_hat"``.
        threat_model_text: the threat model in words.
        timesteps: attack timesteps.
        member_scores / nonmember_scores: per-image error ``[N]`` (mean over timesteps).
        z, p_value: one-sided z statistic and p-value (members lower).
        auc, tpr_at_1pct_fpr: ROC summary.
        per_timestep: the same statistics at each timestep alone.
        fpr, tpr: ROC curve points.
        params: denoiser settings (scale, α, mode for ``eps_hat``).

    The headline figures are the two-sided :attr:`auc_two_sided` and :attr:`abs_z`.
    """

    threat_model: str
    threat_model_text: str
    timesteps: list[int]
    member_scores: torch.Tensor
    nonmember_scores: torch.Tensor
    z: float
    p_value: float
    auc: float
    tpr_at_1pct_fpr: float
    per_timestep: list[dict] = field(default_factory=list)
    fpr: np.ndarray | None = None
    tpr: np.ndarray | None = None
    params: dict = field(default_factory=dict)

    @property
    def auc_two_sided(self) -> float:
        """``max(AUC, 1 − AUC)``: 0.5 = no separation either way, 1 = perfect."""
        return max(self.auc, 1.0 - self.auc)

    @property
    def abs_z(self) -> float:
        """``|z|``: the two-sided strength of the z statistic."""
        return abs(self.z)

    @property
    def direction(self) -> str:
        """``"members lower"``, ``"members higher"`` (flipped leak) or ``"none"``."""
        return two_sided(self.auc, self.z)["direction"]

    def to_dict(self) -> dict:
        """JSON-able summary (scores summarised, not listed); ``two_sided`` is the headline."""
        return {
            "two_sided": two_sided(self.auc, self.z),
            "threat_model": self.threat_model,
            "threat_model_text": self.threat_model_text,
            "timesteps": self.timesteps,
            "n_members": int(self.member_scores.numel()),
            "n_nonmembers": int(self.nonmember_scores.numel()),
            "member_error_mean": float(self.member_scores.mean()),
            "nonmember_error_mean": float(self.nonmember_scores.mean()),
            "z": self.z,
            "p_value": self.p_value,
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "per_timestep": self.per_timestep,
            "params": self.params,
        }


def membership_inference(
    eps_model: nn.Module,
    members,  # [N, C, H, W]
    nonmembers,  # [M, C, H, W]
    schedule,
    *,
    timesteps: Sequence[int] = (50, 100, 200),
    n_noise: int = 1,
    seed: int = 0,
    batch_size: int = 128,
    protector: nn.Module | None = None,
    scale: float = 0.0,
    alpha: float = 0.5,
    mode: str = "repel",
    guidance_range: tuple[int, int] | None = None,
) -> MembershipResult:
    """Run the reconstruction-error attack through ε, or through ε̂ when a protector is given.

    Args:
        eps_model: the ε-model ``(x, t) -> [B, C, H, W]``.
        members: training images ``[N, C, H, W]``.
        nonmembers: images never trained on, same shape.
        schedule: ``NoiseSchedule`` (or ``alphas_cumprod``); ``prediction_type`` is honoured.
        timesteps: training-schedule timesteps to attack at (scores are averaged over them).
        n_noise: noise draws per image and timestep.
        seed: noise seed (members and non-members use disjoint draws of one stream).
        batch_size: images per model call.
        protector: CPSample protector; with ``scale > 0`` the attack goes through ε̂.
        scale, alpha, mode: CPSample's s, α and guidance mode (as used for sampling).
        guidance_range: CPSampler's inclusive ``(t_min, t_max)`` where guidance acts, if any.
    """
    mem, non = image_pair(members, nonmembers, "members", "nonmembers")
    kw = dict(
        timesteps=timesteps,
        n_noise=n_noise,
        batch_size=batch_size,
        protector=protector,
        scale=scale,
        alpha=alpha,
        mode=mode,
        guidance_range=guidance_range,
    )
    em = reconstruction_errors(eps_model, mem, schedule, seed=seed, **kw)
    en = reconstruction_errors(eps_model, non, schedule, seed=seed + 1_000_003, **kw)
    threat = "eps_hat" if protector is not None and scale else "eps"
    per = []
    for k, t in enumerate(timesteps):
        z, p = z_test(em[:, k], en[:, k])
        _, _, auc, tpr1 = roc(em[:, k], en[:, k])
        per.append(
            {
                "t": int(t),
                "z": z,
                "p_value": p,
                "auc": auc,
                "tpr_at_1pct_fpr": tpr1,
                "auc_two_sided": max(auc, 1.0 - auc),
                "abs_z": abs(z),
            }
        )
    ms, ns = em.mean(1), en.mean(1)
    z, p = z_test(ms, ns)
    fpr, tpr, auc, tpr1 = roc(ms, ns)
    params = {"n_noise": n_noise, "seed": seed}
    if threat == "eps_hat":
        params.update(scale=float(scale), alpha=float(alpha), mode=mode)
        if guidance_range is not None:
            params["guidance_range"] = [int(v) for v in guidance_range]
    return MembershipResult(
        threat_model=threat,
        threat_model_text=THREAT_MODELS[threat],
        timesteps=[int(t) for t in timesteps],
        member_scores=ms,
        nonmember_scores=ns,
        z=z,
        p_value=p,
        auc=auc,
        tpr_at_1pct_fpr=tpr1,
        per_timestep=per,
        fpr=fpr,
        tpr=tpr,
        params=params,
    )


def save_roc(results: Sequence[MembershipResult], path) -> None:
    """ROC PNG of one or more attacks (labelled by threat model)."""
    from .plots import save_roc_png

    curves = {}
    for r in results:
        name = r.threat_model
        if r.params.get("scale"):
            name += f" (s={r.params['scale']:g}, a={r.params['alpha']:g})"
        curves[name] = (r.fpr, r.tpr, r.auc)
    save_roc_png(curves, path, title="reconstruction-error membership attack")
