"""Training loop for ε-models: the DDPM simple loss, EMA, atomic safetensors checkpoints, resume.

Used to produce the memorising digits model the demo ships (``scripts/train_digits_unet.py``):
trained long enough on a few dozen images, the model reproduces them — the worst case a defence
must face.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import (
    load_safetensors,
    read_json,
    refuse_pickle,
    save_safetensors_atomic,
    write_json_atomic,
)


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


def _alphas_cumprod(schedule) -> torch.Tensor:
    ac = getattr(schedule, "alphas_cumprod", schedule)
    if not isinstance(ac, torch.Tensor) or ac.dim() != 1:
        raise TypeError("schedule must have alphas_cumprod (a float tensor [T]) or be that tensor")
    return ac.float()


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """safetensors + JSON sidecar, each written atomically (``cpsample_fast.io``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(path, tensors)
    write_json_atomic(path.with_suffix(".json"), meta)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict, **extra) -> None:
    """Write ``model``'s weights as safetensors (prefix ``model.``) and ``meta`` as JSON beside.

    Args:
        path: ``.safetensors`` file; the sidecar is the same name with ``.json``.
        model: weights to store.
        meta: JSON-able metadata (model config, schedule, data fingerprint, ...).
        **extra: more tensors dicts, stored under their keyword as prefix (e.g. ``ema=...``,
            ``opt=...``).
    """
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    for prefix, d in extra.items():
        tensors.update({f"{prefix}.{k}": v.detach().cpu() for k, v in d.items()})
    _atomic_save(tensors, meta, Path(path))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(groups, meta)``: tensors grouped by prefix (``groups["model"]`` is a state dict) and
        the JSON sidecar.
    """
    path = refuse_pickle(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    flat = load_safetensors(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        prefix, _, name = k.partition(".")
        groups.setdefault(prefix, {})[name] = v
    side = path.with_suffix(".json")
    meta = read_json(side) if side.exists() else {}
    return groups, meta


def _opt_state_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{i}.{k}"] = torch.as_tensor(v).clone()
    return out


def _load_opt_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        i, _, name = k.partition(".")
        state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


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
        seed: seeds the timestep/noise/batch draws (resumes re-seed with ``seed + step``).
        checkpoint: ``.safetensors`` path; written atomically every ``checkpoint_every`` steps and
            at the end, with model, EMA and optimiser state.
        checkpoint_every: steps between checkpoints.
        resume: continue from ``checkpoint`` when it exists.
        meta: extra JSON-able metadata stored in the sidecar.
        progress: show a tqdm progress bar.
        log_every: steps per loss-logging window.

    Returns:
        ``(model, report)``; ``model`` holds the EMA weights (or the raw ones without EMA).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got {images!r:.80}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    ac = _alphas_cumprod(schedule)
    T = ac.shape[0]
    device = next(model.parameters()).device
    images = images.float().to(device)
    ac = ac.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if ema_decay else None
    start = 0
    report = TrainReport()
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and resume and ckpt.exists():
        groups, old = load_checkpoint(ckpt)
        model.load_state_dict(groups["model"])
        if ema is not None and "ema" in groups:
            ema = {k: v.to(device) for k, v in groups["ema"].items()}
        if "opt" in groups:
            _load_opt_state(opt, groups["opt"])
        start = int(old.get("step", 0))
        report.losses = [tuple(x) for x in old.get("losses", [])]

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def write(step: int) -> None:
        if ckpt is None:
            return
        extra = {"opt": _opt_state_tensors(opt)}
        if ema is not None:
            extra["ema"] = ema
        info = dict(meta or {}, step=step, total_steps=steps, losses=report.losses)
        save_checkpoint(ckpt, model, info, **extra)

    gen = torch.Generator(device="cpu").manual_seed(seed + start)
    model.train()
    t0 = time.perf_counter()
    window = []
    bar = tqdm(
        range(start, steps), disable=not progress, desc="train ε-model", initial=start, total=steps
    )
    for step in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0 = images[idx.to(device)]
        t = torch.randint(0, T, (batch_size,), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        a = ac[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (model(xt, t) - eps).pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].lerp_(v, 1 - ema_decay)
                    else:
                        ema[k].copy_(v)
        window.append(loss.item())
        if len(window) == log_every or step == steps - 1:
            report.losses.append((step + 1, sum(window) / len(window)))
            bar.set_postfix(loss=f"{report.losses[-1][1]:.4f}")
            window = []
        if (step + 1) % checkpoint_every == 0:
            write(step + 1)
    bar.close()
    report.steps = steps
    report.seconds = time.perf_counter() - t0
    report.images_per_second = (steps - start) * batch_size / max(report.seconds, 1e-9)
    write(steps)
    if ema is not None:
        model.load_state_dict(ema)
    model.eval()
    return model, report
