"""``ProtectorTrainConfig``: every setting of ``train_protector``, checked in one place.

The data (members, hold-out), the schedule, the network and the per-step ``callback`` are the
inputs of :func:`cpsample_fast.protector.train_protector`; everything else is here. The fields
keep ``train_protector``'s keyword names, so ``train_protector(x, schedule=s, steps=100, lr=1e-3)``
and ``train_protector(x, schedule=s, config=ProtectorTrainConfig(steps=100, lr=1e-3))`` are
the same call. The training maths is docs/ALGORITHM.md §2.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..validation import check_int, check_seed


def _check_number(name: str, value: Any, lo: float, *, strict: bool = False) -> float:
    """A finite float ``>= lo`` (``> lo`` with ``strict``); TypeError/ValueError naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v <= lo if strict else v < lo):
        raise ValueError(
            f"{name} must be a finite number {'>' if strict else '>='} {lo:g}, got {v}"
        )
    return v


def check_t_range(name: str, t_range: Any, T: int) -> tuple[int, int] | None:
    """A half-open timestep range ``(lo, hi)`` with ``0 <= lo < hi <= T``, or ``None``."""
    if t_range is None:
        return None
    try:
        lo, hi = (int(v) for v in t_range)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi) of ints, got {t_range!r}") from None
    if not 0 <= lo < hi <= T:
        raise ValueError(f"{name} must satisfy 0 <= lo < hi <= {T} (half-open), got {t_range!r}")
    return lo, hi


def timestep_sampler(
    T: int, t_range: tuple[int, int] | None, t_weights: torch.Tensor | None
) -> Callable[[int, torch.Generator], torch.Tensor]:
    """A function ``(n, gen) -> int64 [n]`` drawing training timesteps."""
    if t_weights is not None:
        w = torch.as_tensor(t_weights, dtype=torch.float64).reshape(-1)
        if w.numel() != T or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(
                f"t_weights must be {T} finite non-negative weights (one per timestep)"
            )
        if t_range is not None:
            lo, hi = t_range
            w = w.clone()
            w[:lo] = 0
            w[hi:] = 0
        if float(w.sum()) <= 0:
            raise ValueError("t_weights must put positive weight on some timestep in t_range")
        return lambda n, gen: torch.multinomial(w, n, replacement=True, generator=gen)
    lo, hi = t_range if t_range is not None else (0, T)
    return lambda n, gen: torch.randint(lo, hi, (n,), generator=gen)


@dataclass(frozen=True)
class ProtectorTrainConfig:
    """Settings of one protector training run (docs/ALGORITHM.md §2).

    Construction checks every field that can be checked without the data or the schedule
    (ints, seeds, finite rates); :meth:`resolve` adds the checks against the schedule's
    length and the data. Bad values raise ``ValueError``/``TypeError`` naming the field.

    Attributes:
        steps: Optimiser steps (total, counting steps done before a resume).
        label_seed: Seed of the labels ``y_i ~ Bernoulli(1/2)``.
        batch_size: Members per step (drawn with replacement).
        holdout_batch_size: Hold-out images per step (default ``batch_size // 2``).
        holdout_weight: Weight of the hold-out loss term.
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay (0: the protector is meant to overfit).
        t_range: Train on ``t ∈ [lo, hi)`` only.
        t_weights: ``[T]`` non-negative sampling weights over timesteps.
        seed: Seed of batches, timesteps, noise and the default network's initialisation.
        device: Where to train.
        autocast: bf16 autocast (default: on for CUDA, off elsewhere).
        target_accuracy: Stop once member accuracy on ``target_t_range`` reaches this (checked
            every ``eval_every`` steps on the first ``report_max_images`` members, fixed noise).
        target_t_range: Timesteps of that check (default: the least-noisy quarter).
        eval_every: Steps between those checks.
        checkpoint_dir: Folder for resumable training state (weights, optimiser, RNG).
        checkpoint_every: Steps between checkpoints (default ``max(steps // 10, 1)``).
        resume: Continue from the state in ``checkpoint_dir`` when there is one (every
            setting but ``steps`` must match; a larger ``steps`` continues a finished run).
        progress: Show a tqdm bar with loss and running member accuracy.
        report_bins: Timestep bins of the report.
        report_max_images: The report (and the early-stop check) scores the first this many
            members and hold-out images once per bin.
        latent: The images are latents (e.g. a VAE's ``latent_dist`` × scaling factor, see
            ``cpsample_fast.diffusers.encode_latents``): finite floats of any range, not pixels
            in [-1, 1]. Recorded in the run's identity.
    """

    steps: int
    label_seed: int = 0
    batch_size: int = 64
    holdout_batch_size: int | None = None
    holdout_weight: float = 1.0
    lr: float = 2e-3
    weight_decay: float = 0.0
    t_range: tuple[int, int] | None = None
    t_weights: torch.Tensor | None = None
    seed: int = 0
    device: str | torch.device = "cpu"
    autocast: bool | None = None
    target_accuracy: float | None = None
    target_t_range: tuple[int, int] | None = None
    eval_every: int = 50
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int | None = None
    resume: bool = True
    progress: bool = True
    report_bins: int = 10
    report_max_images: int = 4096
    latent: bool = False

    def __post_init__(self) -> None:
        checked = {
            "steps": check_int("steps", self.steps),
            "batch_size": check_int("batch_size", self.batch_size),
            "eval_every": check_int("eval_every", self.eval_every),
            "report_max_images": check_int("report_max_images", self.report_max_images),
            "report_bins": check_int("report_bins", self.report_bins),
            "lr": _check_number("lr", self.lr, 0.0, strict=True),
            "holdout_weight": _check_number("holdout_weight", self.holdout_weight, 0.0),
            "weight_decay": _check_number("weight_decay", self.weight_decay, 0.0),
            "seed": check_seed("seed", self.seed),
            "label_seed": check_seed("label_seed", self.label_seed),
            "device": torch.device(self.device),
        }
        if self.holdout_batch_size is not None:
            # 0 is allowed and means one image per step (as does the default for tiny batches)
            checked["holdout_batch_size"] = check_int(
                "holdout_batch_size", self.holdout_batch_size, lo=0
            )
        if self.checkpoint_every is not None:
            checked["checkpoint_every"] = check_int("checkpoint_every", self.checkpoint_every)
        if self.target_accuracy is not None:
            if not 0.0 < float(self.target_accuracy) <= 1.0:
                raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy!r}")
            checked["target_accuracy"] = float(self.target_accuracy)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_kwargs(cls, config: ProtectorTrainConfig | None, **overrides) -> ProtectorTrainConfig:
        """``config`` with ``overrides`` applied (or a new config from them); unknown names are a
        TypeError naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"train_protector() got unexpected keyword argument(s) {unknown}; settings are "
                "the fields of ProtectorTrainConfig"
            )
        if config is None:
            return cls(**overrides)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a ProtectorTrainConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **overrides) if overrides else config

    def resolve(self, T: int, *, has_holdout: bool, world: int) -> ProtectorTrainConfig:
        """The settings for a schedule of ``T`` steps and this data: defaults filled in, ranges
        checked against ``T``, the batch checked against the number of processes."""
        if self.batch_size < world:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be >= the number of processes ({world}): "
                "every rank trains on a slice of each global batch"
            )
        t_range = check_t_range("t_range", self.t_range, T)
        timestep_sampler(T, t_range, self.t_weights)  # checks the weights before any training
        hb = self.batch_size // 2 if self.holdout_batch_size is None else self.holdout_batch_size
        return dataclasses.replace(
            self,
            holdout_batch_size=max(hb, 1) if has_holdout else None,
            checkpoint_every=self.checkpoint_every or max(self.steps // 10, 1),
            t_range=t_range,
            target_t_range=check_t_range("target_t_range", self.target_t_range, T)
            or (0, max(T // 4, 1)),
        )

    @property
    def use_autocast(self) -> bool:
        """bf16 autocast: ``autocast``, or on for CUDA devices when it is ``None``."""
        return self.device.type == "cuda" if self.autocast is None else bool(self.autocast)
