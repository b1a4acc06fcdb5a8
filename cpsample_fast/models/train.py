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


def _tensor_sha256(x: torch.Tensor) -> str:
    """Hash of the exact float32 bytes (resuming on other data must be refused)."""
    digest = hashlib.sha256()
    for chunk in x.detach().split(1024):
        digest.update(chunk.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


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
        "data_sha256": _tensor_sha256(images),
        "schedule_sha256": _tensor_sha256(ac),
        **settings,
    }
    # Through JSON once, so tuples become lists exactly as in the stored copy.
    return json.loads(json.dumps(identity, sort_keys=True))


def _check_identity(ckpt: Path, saved: dict | None, identity: dict) -> None:
    if saved is None:
        raise ValueError(
            f"checkpoint {str(ckpt)!r} has no training identity (not written by "
            "train_diffusion, or by an older version); pass resume=False to start over"
        )
    if saved != identity:
        diff = sorted(k for k in set(identity) | set(saved) if identity.get(k) != saved.get(k))
        raise ValueError(
            f"checkpoint {str(ckpt)!r} holds a training run with different data or settings "
            f"({', '.join(diff)}); pass resume=False to start over or use another checkpoint"
        )


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
    ac = alphas_cumprod_of(schedule)
    T = ac.shape[0]
    device = next(model.parameters()).device
    images = images.float().to(device)
    ac = ac.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if ema_decay else None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = 0
    window: list[float] = []
    report = TrainReport()
    ckpt = Path(checkpoint) if checkpoint is not None else None
    # ``steps`` is left out on purpose: a larger ``steps`` continues a finished run (the cosine
    # decay is then stretched over the new total, so only an unchanged ``steps`` reproduces an
    # uninterrupted run bit for bit).
    identity = (
        None
        if ckpt is None
        else _train_identity(
            model,
            images,
            ac,
            {
                "batch_size": int(batch_size),
                "lr": float(lr),
                "warmup": int(warmup),
                "ema_decay": float(ema_decay),
                "seed": int(seed),
            },
        )
    )
    if ckpt is not None and resume and ckpt.exists():
        groups, old = load_checkpoint(ckpt)
        _check_identity(ckpt, old.get("identity"), identity)
        if "rng" not in groups or "train" not in groups["rng"]:
            raise ValueError(f"checkpoint {str(ckpt)!r} lacks the training RNG state")
        start = int(old["step"])
        if start > steps:
            raise ValueError(
                f"checkpoint {str(ckpt)!r} is already at step {start} > steps={steps}; "
                "pass a larger steps or resume=False"
            )
        model.load_state_dict(groups["model"])
        if ema is not None:
            ema = {k: v.to(device) for k, v in groups["ema"].items()}
        _load_opt_state(opt, groups.get("opt", {}))
        gen.set_state(groups["rng"]["train"])
        report.losses = [tuple(x) for x in old.get("losses", [])]
        window = [float(v) for v in old.get("loss_window", [])]

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def write(step: int) -> None:
        if ckpt is None:
            return
        # The generator state (uint8) travels in the same file as the weights, so a resumed
        # run draws exactly the batches, timesteps and noise an uninterrupted run would.
        extra = {"opt": _opt_state_tensors(opt), "rng": {"train": gen.get_state()}}
        if ema is not None:
            extra["ema"] = ema
        info = dict(
            meta or {},
            step=step,
            total_steps=steps,
            losses=report.losses,
            loss_window=window,
            identity=identity,
        )
        save_checkpoint(ckpt, model, info, **extra)

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, steps), disable=not progress, desc="train ε-model", initial=start, total=steps
    )
    for step in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0 = images[idx.to(device)]
        t = torch.randint(0, T, (batch_size,), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        xt = forward_noise(x0, eps, t, ac)
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
    if start < steps or ckpt is None or not ckpt.exists():
        write(steps)
    if ema is not None:
        model.load_state_dict(ema)
    model.eval()
    return model, report
