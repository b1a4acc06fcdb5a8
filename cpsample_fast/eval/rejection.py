"""Rejection sampling with the protector: the baseline CPSample claims to replace.

The CPSample paper says its guidance "behaves like a built-in rejection sampler". This module
is that rejection sampler, so the claim can be measured on a user's own model: draw plain DDIM
samples in batches (the counter-based noise of ``CPSampler``: sample ``i`` of seed ``s`` is the
same image whatever the batch), score every finished sample with the protector at a small
timestep, and keep a sample only when the protector's gate stays shut on it,
``min(r, 1 − r) ≥ α`` (the same comparison as ``guidance.gate``, docs/ALGORITHM.md §3), until
``n`` samples are kept or the draw budget is spent.

Cost is counted in model evaluations: every drawn sample costs ``num_inference_steps``
eps-model evaluations plus one protector evaluation, accepted or not. CPSample's cost per image
is its steps (plus a protector forward and backward on guided steps); rejection's is that
divided by the acceptance rate.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..guidance import check_alpha, gate
from ..protector.fit import check_protector_fits
from ..validation import check_protector_output

# Default timestep at which finished samples are scored: 0, the smallest training timestep (the
# state the last DDIM step of a 'leading' schedule starts from; x_0 and x_t at t = 0 differ by
# √(1-ᾱ_0) ≈ 0.01 of noise, which is not added: the finished sample is scored as it is).
DEFAULT_SCORE_TIMESTEP = 0


@dataclass
class RejectionResult:
    """What :func:`rejection_sample` kept and what it cost.

    Attributes:
        samples: accepted samples ``[n_accepted, C, H, W]`` (float32), in draw order.
        accepted_index: global sample index (noise counter) of each accepted sample ``[n_acc]``.
        n_requested: the ``n`` asked for.
        n_drawn: samples drawn (each a full DDIM run).
        logits: protector logit of every drawn sample ``[n_drawn]`` at ``score_timestep``.
        acceptance_rate: fraction of drawn samples with the gate shut.
        model_evaluations: eps-model evaluations spent (``n_drawn × num_inference_steps``).
        protector_evaluations: protector evaluations spent (``n_drawn``).
        exhausted: the draw budget ran out before ``n`` samples were accepted.
        params: α, score timestep, steps, η, seed, budget.
    """

    samples: torch.Tensor
    accepted_index: torch.Tensor
    n_requested: int
    n_drawn: int
    logits: torch.Tensor
    model_evaluations: int
    protector_evaluations: int
    exhausted: bool
    params: dict = field(default_factory=dict)

    @property
    def n_accepted(self) -> int:
        return int(self.samples.shape[0])

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drawn samples whose gate stayed shut (including any accepted in the last
        batch beyond the ``n`` kept)."""
        if not self.n_drawn:
            return 0.0
        return float((~gate(self.logits, self.params["alpha"])).float().mean())

    @property
    def evals_per_accepted(self) -> float:
        """eps-model evaluations per accepted image (inf when none was accepted)."""
        return self.model_evaluations / self.n_accepted if self.n_accepted else float("inf")

    @property
    def message(self) -> str:
        head = (
            f"rejection sampling accepted {self.n_accepted} of {self.n_drawn} drawn "
            f"({100 * self.acceptance_rate:.1f}%), {self.model_evaluations} model evaluations"
        )
        if self.exhausted:
            return (
                f"{head}: the draw budget of {self.params.get('max_draws')} ran out before "
                f"{self.n_requested} samples were accepted; returning the {self.n_accepted} kept"
            )
        return head

    def to_dict(self) -> dict:
        """JSON-able summary (no images)."""
        epa = self.evals_per_accepted
        return {
            "n_requested": self.n_requested,
            "n_accepted": self.n_accepted,
            "n_drawn": self.n_drawn,
            "acceptance_rate": self.acceptance_rate,
            "model_evaluations": self.model_evaluations,
            "protector_evaluations": self.protector_evaluations,
            "model_evaluations_per_accepted": epa if epa != float("inf") else None,
            "exhausted": self.exhausted,
            "message": self.message,
            "params": self.params,
        }


def _image_shape_of(eps_model) -> tuple[int, int, int] | None:
    """``(C, H, W)`` from a model's config (package UNet, diffusers UNet, EmpiricalDenoiser)."""
    shape = getattr(eps_model, "image_shape", None)
    if shape is not None and len(shape) == 3:
        return tuple(int(s) for s in shape)
    try:
        from ..models.loading import sample_shape

        return sample_shape(eps_model)
    except ValueError:
        return None


def _check_rejection_args(
    eps_model, protector, schedule, n, *, alpha, sample_shape, max_draws, batch_size,
    score_timestep,
):  # fmt: skip
    """Check :func:`rejection_sample`'s arguments; returns ``(max_draws, sample_shape)`` with
    their defaults filled in (``100 · n`` draws; the shape from the model's config)."""
    try:
        check_alpha(alpha)
    except ValueError as err:
        raise ValueError(f"rejection_sample: {err}") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if max_draws is None:
        max_draws = 100 * n
    if isinstance(max_draws, bool) or not isinstance(max_draws, int) or max_draws < n:
        raise ValueError(
            f"max_draws (the draw budget) must be an int >= n = {n}, got {max_draws!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    T = int(schedule.num_train_timesteps)
    if not 0 <= int(score_timestep) < T:
        raise ValueError(f"score_timestep must be in [0, {T - 1}], got {score_timestep}")
    if protector is None:
        raise ValueError("rejection_sample needs a protector to score the samples")
    if sample_shape is None:
        sample_shape = _image_shape_of(eps_model)
        if sample_shape is None:
            raise ValueError("sample_shape (C, H, W) must be given: the model's config lacks it")
    sample_shape = tuple(int(s) for s in sample_shape)
    if len(sample_shape) != 3 or min(sample_shape) < 1:
        raise ValueError(f"sample_shape must be (C, H, W), got {sample_shape}")
    return max_draws, sample_shape


def rejection_sample(
    eps_model,
    protector,
    schedule,
    n: int,
    *,
    alpha: float,
    num_inference_steps: int = 50,
    sample_shape: tuple[int, int, int] | None = None,
    eta: float = 0.0,
    seed: int = 0,
    max_draws: int | None = None,
    batch_size: int = 64,
    score_timestep: int = DEFAULT_SCORE_TIMESTEP,
    device=None,
    backend: str = "auto",
    progress: bool = False,
) -> RejectionResult:
    """Plain DDIM samples that the protector does not recognise (module doc).

    Args:
        eps_model: the ε-model ``(x, t) -> [B, C, H, W]``.
        protector: ``protector(x, t) -> logits [B]`` for images of the model's shape.
        schedule: a ``NoiseSchedule``.
        n: samples wanted (≥ 1).
        alpha: gate threshold α ∈ (0, 0.5]; a sample is kept when ``min(r, 1 − r) ≥ α``,
            i.e. the gate CPSample uses stays shut on it.
        num_inference_steps: DDIM steps per draw.
        sample_shape: ``(C, H, W)``; default from the model's config.
        eta: DDIM η.
        seed: noise seed; draw ``i`` is sample ``i`` of that seed (``CPSampler`` with
            ``scale=0``, ``sample_offset=i``), so accepted samples are plain DDIM samples.
        max_draws: the draw budget, ≥ n (default ``100 · n``). When it runs out, what was
            accepted is returned, ``exhausted`` is set and a warning says so.
        batch_size: samples drawn per sampler call.
        score_timestep: training timestep at which finished samples are scored (default
            ``DEFAULT_SCORE_TIMESTEP`` = 0: the finished sample is fed as it is with ``t = 0``).
        device: where to sample (default: the model's device).
        backend: ``CPSampler`` backend.
        progress: show a tqdm bar over the draws.

    Raises:
        ValueError: α outside (0, 0.5], ``max_draws < n``, ``n < 1``, a bad timestep, or a
            protector that cannot score images of the model's shape.
    """
    from ..sampler import CPSampler

    max_draws, sample_shape = _check_rejection_args(
        eps_model, protector, schedule, n, alpha=alpha, sample_shape=sample_shape,
        max_draws=max_draws, batch_size=batch_size, score_timestep=score_timestep,
    )  # fmt: skip
    sampler = CPSampler(
        eps_model,
        None,
        schedule,
        num_inference_steps=num_inference_steps,
        eta=eta,
        scale=0.0,
        backend=backend,
    )
    if device is None:
        device = sampler._default_device(None)
    check_protector_fits(protector, sample_shape, probe=True, device=device)

    kept, kept_idx, all_logits = [], [], []
    drawn = n_acc = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="rejection (accepted)")
    while n_acc < n and drawn < max_draws:
        size = min(batch_size, max_draws - drawn)
        x = sampler.sample((size, *sample_shape), seed=seed, sample_offset=drawn, device=device)
        t = torch.full((size,), int(score_timestep), dtype=torch.int64, device=x.device)
        with torch.no_grad():
            f = check_protector_output(protector(x, t), size, None, None).float()
        accept = ~gate(f, alpha)  # min(r, 1 - r) >= α: the gate stays shut
        idx = torch.arange(drawn, drawn + size, dtype=torch.int64)
        take = accept.nonzero().flatten()[: n - n_acc]
        kept.append(x[take].cpu())
        kept_idx.append(idx[take.cpu()])
        all_logits.append(f.cpu())
        drawn += size
        n_acc += int(take.numel())
        if bar is not None:
            bar.update(int(take.numel()))
    if bar is not None:
        bar.close()
    samples = torch.cat(kept) if kept else torch.empty((0, *sample_shape))
    result = RejectionResult(
        samples=samples,
        accepted_index=torch.cat(kept_idx) if kept_idx else torch.empty(0, dtype=torch.int64),
        n_requested=n,
        n_drawn=drawn,
        logits=torch.cat(all_logits),
        model_evaluations=drawn * num_inference_steps,
        protector_evaluations=drawn,
        exhausted=n_acc < n,
        params={
            "alpha": float(alpha),
            "score_timestep": int(score_timestep),
            "num_inference_steps": int(num_inference_steps),
            "eta": float(eta),
            "seed": int(seed),
            "max_draws": int(max_draws),
        },
    )
    if result.exhausted:
        warnings.warn(result.message, RuntimeWarning, stacklevel=2)
    return result
