"""Training loop for ε-models: the DDPM simple loss, EMA and resume (files: :mod:`.checkpoint`).

Used to produce the memorising digits model the demo ships (``scripts/train_digits_unet.py``):
trained long enough on a few dozen images, the model reproduces them — the worst case a defence
must face.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import check_images
from ..resume import (
    as_json,
    check_identity,
    check_resume_step,
    load_optimizer_state,
    optimizer_state,
    tensor_sha256,
)
from ..schedule import alphas_cumprod_of, forward_noise
from .checkpoint import load_checkpoint, save_checkpoint

TRAIN_STATE_FORMAT = "cpsample_fast.train-diffusion-state/1"


@dataclass
class TrainReport:
    """What :func:`train_diffusion` did.

    Attributes:
        steps: optimiser steps taken in total (including resumed ones).
        losses: mean loss per logging window, ``(step, loss)`` pairs.
        seconds: wall time of this call.
        images_per_second: training throughput of this call.
    """

    steps: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def _train_identity(
    model: nn.Module, images: torch.Tensor, ac: torch.Tensor, settings: dict
) -> dict:
    """Everything that must match for a resumed run to continue the same run."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    config = getattr(model, "config", None)
    identity = {
        "format": TRAIN_STATE_FORMAT,
        "architecture": type(model).__qualname__,
        "model_config": config.to_dict() if hasattr(config, "to_dict") else None,
        "parameter_shapes_sha256": hashlib.sha256(
            json.dumps(shapes, sort_keys=True).encode()
        ).hexdigest(),
        "data_shape": [int(s) for s in images.shape],
        "data_sha256": tensor_sha256(images),
        "schedule_sha256": tensor_sha256(ac),
        **settings,
    }
    return as_json(identity)


def warmup_cosine_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """``ema ← decay·ema + (1 - decay)·weights`` for float tensors; integer buffers copied."""
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            ema[k].lerp_(v, 1 - decay)
        else:
            ema[k].copy_(v)


@dataclass
class _State:
    """What a checkpoint carries besides the weights: optimiser, generator, EMA, losses."""

    model: nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    ema: dict[str, torch.Tensor] | None
    report: TrainReport
    window: list[float] = field(default_factory=list)

    def save(self, ckpt: Path, step: int, steps: int, identity: dict, meta: dict | None) -> None:
        # The generator state (uint8) travels in the same file as the weights, so a resumed
        # run draws exactly the batches, timesteps and noise an uninterrupted run would.
        tensors, rest = optimizer_state(self.opt)
        tensors.update({k: torch.as_tensor(v) for k, v in rest["plain"].items()})
        extra = {"opt": {k: v.clone() for k, v in tensors.items()}}
        extra["rng"] = {"train": self.gen.get_state()}
        if self.ema is not None:
            extra["ema"] = self.ema
        info = dict(meta or {}, step=step, total_steps=steps, losses=self.report.losses,
                    loss_window=self.window, identity=identity)  # fmt: skip
        save_checkpoint(ckpt, self.model, info, **extra)

    def resume(self, ckpt: Path, steps: int, identity: dict) -> int:
        """Load ``ckpt`` (same run, checked) and return its step."""
        groups, old = load_checkpoint(ckpt)
        check_identity(old.get("identity"), identity, where=f"checkpoint {str(ckpt)!r}",
                       retry="checkpoint")  # fmt: skip
        if "rng" not in groups or "train" not in groups["rng"]:
            raise ValueError(f"checkpoint {str(ckpt)!r} lacks the training RNG state")
        start = check_resume_step(
            int(old["step"]), steps, where=f"checkpoint {str(ckpt)!r}", retry="checkpoint"
        )
        self.model.load_state_dict(groups["model"])
        if self.ema is not None:
            device = next(self.model.parameters()).device
            self.ema = {k: v.to(device) for k, v in groups["ema"].items()}
        load_optimizer_state(self.opt, groups.get("opt", {}))
        self.gen.set_state(groups["rng"]["train"])
        self.report.losses = [tuple(x) for x in old.get("losses", [])]
        self.window = [float(v) for v in old.get("loss_window", [])]
        return start


def train_diffusion(
    model: nn.Module,
    images: torch.Tensor,  # [N, C, H, W] in [-1, 1]
    schedule,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 200,
    ema_decay: float = 0.999,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    meta: dict | None = None,
    progress: bool = True,
    log_every: int = 100,
) -> tuple[nn.Module, TrainReport]:
    """Train an ε-model with the DDPM simple loss ``‖ε - ε_θ(√ᾱ_t x + √(1-ᾱ_t) ε, t)‖²``.

    No augmentation: the goal here is a model of the training set itself (for the memorising
    models). Adam with linear warm-up then cosine decay to 10% of ``lr``; the returned model
    carries the EMA weights when ``ema_decay > 0``.

    Args:
        model: ``(x [B, C, H, W], t int64 [B]) -> ε``.
        images: training images ``[N, C, H, W]``, float, in [-1, 1].
        schedule: a ``NoiseSchedule`` (anything with ``alphas_cumprod [T]``) or that tensor.
        steps: total optimiser steps (a resumed run continues up to this number).
        batch_size: images per step (drawn with replacement).
        lr: peak learning rate.
        warmup: linear warm-up steps.
        ema_decay: EMA of the weights (0 disables).
        seed: seeds the timestep/noise/batch draws (one generator; its state is checkpointed).
        checkpoint: ``.safetensors`` path; written atomically every ``checkpoint_every`` steps and
            at the end, with model, EMA, optimiser and generator state and the step in one file.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` when it exists. Data, model architecture, schedule,
            ``batch_size``, ``lr``, ``warmup``, ``ema_decay`` and ``seed`` must match (else
            ``ValueError``); with ``steps`` unchanged, a killed and resumed run ends with the
            same weights, bit for bit, as an uninterrupted one. A larger ``steps`` continues a
            finished run.
        meta: extra JSON-able metadata stored in the sidecar.
        progress: show a tqdm progress bar.
        log_every: steps per loss-logging window.

    Returns:
        ``(model, report)``; ``model`` holds the EMA weights (or the raw ones without EMA).
    """
    images = check_images(images, "images", value_range=None)
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    device = next(model.parameters()).device
    images = images.float().to(device)
    ac = alphas_cumprod_of(schedule).to(device)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if ema_decay else None
    st = _State(model, torch.optim.Adam(model.parameters(), lr=lr),
                torch.Generator(device="cpu").manual_seed(seed), ema, TrainReport())  # fmt: skip
    ckpt = Path(checkpoint) if checkpoint is not None else None
    # ``steps`` is left out on purpose: a larger ``steps`` continues a finished run (the cosine
    # decay is then stretched over the new total, so only an unchanged ``steps`` reproduces an
    # uninterrupted run bit for bit).
    settings = {"batch_size": int(batch_size), "lr": float(lr), "warmup": int(warmup),
                "ema_decay": float(ema_decay), "seed": int(seed)}  # fmt: skip
    identity = None if ckpt is None else _train_identity(model, images, ac, settings)
    start = st.resume(ckpt, steps, identity) if ckpt is not None and resume and ckpt.exists() else 0

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, steps), disable=not progress, desc="train ε-model", initial=start, total=steps
    )
    for step in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=st.gen)
        x0 = images[idx.to(device)]
        t = torch.randint(0, ac.shape[0], (batch_size,), generator=st.gen).to(device)
        eps = torch.randn(x0.shape, generator=st.gen).to(device)
        loss = (model(forward_noise(x0, eps, t, ac), t) - eps).pow(2).mean()
        for g in st.opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, lr, warmup, steps)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        if st.ema is not None:
            _ema_update(st.ema, model, ema_decay)
        st.window.append(loss.item())
        if len(st.window) == log_every or step == steps - 1:
            st.report.losses.append((step + 1, sum(st.window) / len(st.window)))
            bar.set_postfix(loss=f"{st.report.losses[-1][1]:.4f}")
            st.window = []
        if ckpt is not None and (step + 1) % checkpoint_every == 0:
            st.save(ckpt, step + 1, steps, identity, meta)
    bar.close()
    report = st.report
    report.steps = steps
    report.seconds = time.perf_counter() - t0
    report.images_per_second = (steps - start) * batch_size / max(report.seconds, 1e-9)
    if ckpt is not None and (start < steps or not ckpt.exists()):
        st.save(ckpt, steps, steps, identity, meta)
    if st.ema is not None:
        model.load_state_dict(st.ema)
    model.eval()
    return model, report
