"""Per-step, per-sample record of what the protector saw (``return_trace=True``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingTrace:
    """What guidance did at each step, for audits and plots.

    Attributes:
        timesteps: ``[steps]`` int64, the training-schedule timestep of each loop step.
        logits: ``[steps, B]`` protector logits f (NaN where the protector was not run).
        confidence: ``[steps, B]`` ``q = max(r, 1 - r)`` (NaN where the protector was not run).
        gate: ``[steps, B]`` bool, whether guidance acted on the sample at that step.
    """

    timesteps: torch.Tensor
    logits: torch.Tensor
    confidence: torch.Tensor
    gate: torch.Tensor

    @classmethod
    def empty(cls, timesteps: torch.Tensor, batch: int, device) -> SamplingTrace:
        n = timesteps.numel()
        nan = torch.full((n, batch), float("nan"), device=device)
        return cls(
            timesteps=timesteps.to(device),
            logits=nan.clone(),
            confidence=nan.clone(),
            gate=torch.zeros(n, batch, dtype=torch.bool, device=device),
        )

    def to(self, device) -> SamplingTrace:
        return SamplingTrace(*(getattr(self, k).to(device) for k in self.__dataclass_fields__))

    def gate_fraction(self) -> torch.Tensor:
        """``[steps]`` fraction of the batch that was guided at each step."""
        return self.gate.float().mean(dim=1)

    def to_dict(self) -> dict:
        """JSON-able lists (NaN becomes None)."""

        def clean(t: torch.Tensor):
            return [[None if v != v else v for v in row] for row in t.float().cpu().tolist()]

        return {
            "timesteps": self.timesteps.cpu().tolist(),
            "logits": clean(self.logits),
            "confidence": clean(self.confidence),
            "gate": self.gate.cpu().int().tolist(),
        }
