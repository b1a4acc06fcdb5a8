"""Drawing the tuner's samples and attacks: one ``CPSampler`` per candidate, batched, with
counter-based noise (a pool grows by the next ``sample_offset``s), the ε̂ membership attack per
guidance setting (cached), and the rejection-sampling baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .space import Candidate

# The plain DDIM baseline: scale 0 (no protector), DDIM at the tuner's step count.
DDIM = ("repel", 0.5, 0.0, None, "ddim", None)


class CandidateSampler:
    """Samples, membership attacks and model-evaluation counts for candidates.

    Args:
        eps_model, protector, schedule: What ``CPSampler`` takes.
        members, nonmembers: The attack's images ``[N, C, H, W]``.
        num_inference_steps, eta: The DDIM baseline's steps (a candidate's ``steps`` of
            ``None`` means these) and η.
        attack_timesteps: Timesteps of the membership attack.
        batch_size: Samples per sampler call.
        backend: ``CPSampler`` backend.
    """

    def __init__(
        self, eps_model, protector, schedule, *, members: torch.Tensor, nonmembers: torch.Tensor,
        num_inference_steps: int, eta: float, attack_timesteps: Sequence[int], batch_size: int,
        backend: str,
    ) -> None:  # fmt: skip
        self.eps_model, self.protector, self.schedule = eps_model, protector, schedule
        self.members, self.nonmembers = members, nonmembers
        self.shape = tuple(members.shape[1:])
        self.num_inference_steps, self.eta = num_inference_steps, eta
        self.attack_timesteps, self.batch_size, self.backend = attack_timesteps, batch_size, backend
        self._attacks: dict = {}

    def steps_of(self, cand: Candidate) -> int:
        return cand[5] or self.num_inference_steps

    def draw(self, cand: Candidate, seed: int, offset: int, n: int) -> torch.Tensor:
        """``n`` samples of ``cand`` for ``seed``, noise counters ``offset .. offset + n - 1``."""
        from ..sampler import CPSampler

        mode, alpha, scale, grange, solver, _ = cand
        sampler = CPSampler(
            self.eps_model,
            self.protector if scale else None,
            self.schedule,
            num_inference_steps=self.steps_of(cand),
            solver=solver,
            eta=self.eta,
            scale=scale,
            alpha=alpha,
            mode=mode,
            guidance_range=grange,
            backend=self.backend,
        )
        out = []
        for s in range(0, n, self.batch_size):
            b = min(self.batch_size, n - s)
            out.append(sampler.sample((b, *self.shape), seed=seed, sample_offset=offset + s))
        return torch.cat(out)

    def attack(self, cand: Candidate | None):
        """The two-sided membership attack through ε̂ of ``cand`` (through ε for ``None``); the
        attack queries ε̂ of one step, so the solver plays no part and results are cached by
        guidance setting."""
        from ..eval import membership_inference

        key = None if cand is None else cand[:4]
        if key not in self._attacks:
            kw = {}
            if cand is not None:
                mode, alpha, scale, grange = key
                kw = dict(protector=self.protector, scale=scale, alpha=alpha, mode=mode,
                          guidance_range=grange)  # fmt: skip
            self._attacks[key] = membership_inference(
                self.eps_model, self.members, self.nonmembers, self.schedule,
                timesteps=self.attack_timesteps, **kw,
            )  # fmt: skip
        return self._attacks[key]

    def guided_steps(self, cand: Candidate) -> int:
        """Protector evaluations per image: the steps whose t lies in the guidance range."""
        from ..solvers import guided_step_count

        return guided_step_count(self.schedule, self.steps_of(cand), cand[4], cand[3])

    def rejection(self, n: int, *, alpha: float, seed: int, max_draws: int):
        """The rejection-sampling baseline at ``alpha`` (``eval.rejection_sample``)."""
        from ..eval import rejection_sample

        return rejection_sample(
            self.eps_model, self.protector, self.schedule, n, alpha=alpha,
            num_inference_steps=self.num_inference_steps, eta=self.eta, sample_shape=self.shape,
            seed=seed, max_draws=max_draws, batch_size=self.batch_size, backend=self.backend,
        )  # fmt: skip
