"""``train_protector`` (docs/ALGORITHM.md §2); checkpoints are in :mod:`.checkpoint`.

Training minimises binary cross-entropy of ``f(√ᾱ_t x_i + √(1-ᾱ_t) ε, t)`` against the random
member labels ``y_i``, with ``t`` uniform over the schedule (or a sub-range / weighting); hold-out
images, when given, are pulled toward the soft target 1/2. Every random draw (batch indices,
timesteps, noise, the default network's initialisation) comes from generators seeded by
``seed``; the training generator's state is checkpointed with the weights and the optimiser,
so a run killed and resumed ends with the same weights as an uninterrupted one.

Under ``torchrun`` (a ``torch.distributed`` process group is initialised; gloo on CPU, NCCL on
GPU) the model is wrapped in ``DistributedDataParallel``. Every rank draws the same *global*
batch from the same generator and computes the loss of its slice, scaled so that the averaged
gradient is the gradient of the global-batch loss: labels, fingerprint and (to float tolerance)
the weights are the same whatever the world size, and a state written with one world size
resumes under another. Only rank 0 writes checkpoints. The maths is docs/ALGORITHM.md §2.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import as_image_tensor, check_images
from ..io import (
    ensure_writable_dir,
    load_safetensors,
    read_json,
    save_safetensors_atomic,
    write_json_atomic,
)
from ..validation import check_int, check_seed
from .labels import dataset_fingerprint, draw_labels
from .model import ProtectorNet
from .report import ProtectorReport, evaluate_protector, noised, timestep_bins

TRAIN_STATE_FORMAT = "cpsample_fast.protector-train-state/1"
_STATE_JSON = "train_state.json"
# The only file names a train_state.json pointer may name (same folder, no path parts).
_WEIGHTS_RE = re.compile(r"train_state-\d{9}\.safetensors")


def _check_finite(name: str, value: Any, lo: float, *, strict: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (v <= lo if strict else v < lo):
        raise ValueError(
            f"{name} must be a finite number {'>' if strict else '>='} {lo:g}, got {v}"
        )
    return v


def _dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _timestep_sampler(
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


def _check_t_range(t_range: Any, T: int) -> tuple[int, int] | None:
    if t_range is None:
        return None
    try:
        lo, hi = (int(v) for v in t_range)
    except (TypeError, ValueError):
        raise ValueError(f"t_range must be a pair (lo, hi) of ints, got {t_range!r}") from None
    if not 0 <= lo < hi <= T:
        raise ValueError(f"t_range must satisfy 0 <= lo < hi <= {T} (half-open), got {t_range!r}")
    return lo, hi


def _build_protector(
    protector: nn.Module | Mapping[str, Any] | None, images: torch.Tensor, seed: int
) -> nn.Module:
    """The user's module, or a seeded ``ProtectorNet`` sized for the data."""
    if isinstance(protector, nn.Module):
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in protector.modules()):
            raise ValueError(
                "protector contains BatchNorm, which mixes samples across the batch in training; "
                "guidance needs per-sample logits (use GroupNorm or LayerNorm; docs/ALGORITHM.md "
                "§2)"
            )
        return protector
    if protector is not None and not isinstance(protector, Mapping):
        raise TypeError(
            "protector must be an nn.Module(x, t) -> [B], a ProtectorNet config mapping or None, "
            f"got {type(protector).__name__}"
        )
    _, c, h, w = images.shape
    config = {"in_channels": c, "resolution": max(h, w)}
    config.update(protector or {})
    # A private RNG stream for the initialisation: reproducible and the caller's global RNG is
    # left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProtectorNet(**config)


def _probe(protector: nn.Module, images: torch.Tensor, device: torch.device) -> None:
    """Run two samples through the protector; turn shape problems into a clear ValueError."""
    x = images[:2].to(device)
    t = torch.zeros(x.shape[0], dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            out = protector(x, t)
    except Exception as exc:  # noqa: BLE001 - any failure here means "incompatible with data"
        raise ValueError(
            f"protector does not accept images of shape {tuple(images.shape[1:])} (C, H, W): {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0],):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"protector(x, t) must return logits of shape [B], got {shape}")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into safetensors tensors and JSON-able rest."""
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                plain[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, rest: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in rest["plain"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def _save_train_state(
    ckpt_dir: Path,
    step: int,
    protector: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    identity: dict,
    progress_state: dict,
) -> None:
    """Weights + optimiser + RNG at ``step``; the JSON pointer is written last (the commit)."""
    opt_tensors, opt_rest = _optimizer_tensors(opt)
    tensors = {f"model.{k}": v for k, v in protector.state_dict().items()}
    tensors.update(opt_tensors)
    tensors["rng.train"] = gen.get_state()
    name = f"train_state-{step:09d}.safetensors"
    save_safetensors_atomic(ckpt_dir / name, tensors)
    write_json_atomic(
        ckpt_dir / _STATE_JSON,
        {
            "format": TRAIN_STATE_FORMAT,
            "step": step,
            "weights": name,
            "identity": identity,
            "optimizer": opt_rest,
            "progress": progress_state,
        },
    )
    # Older states are found by listing the folder, never by reading a path from the pointer
    # (a tampered pointer must not be able to delete anything, least of all outside it).
    for p in ckpt_dir.iterdir():
        if p.name != name and _WEIGHTS_RE.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def _load_train_state(ckpt_dir: Path, identity: dict) -> tuple[dict, dict] | None:
    """The latest state in ``ckpt_dir`` (or ``None``); refuses one from a different run."""
    pointer = ckpt_dir / _STATE_JSON
    if not pointer.is_file():
        return None
    state = read_json(pointer)
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{str(pointer)!r} is not a protector training state")
    if state["identity"] != identity:
        diff = sorted(
            k
            for k in set(identity) | set(state["identity"])
            if identity.get(k) != state["identity"].get(k)
        )
        raise ValueError(
            f"checkpoint_dir {str(ckpt_dir)!r} holds a training run with different settings "
            f"({', '.join(diff)}); pass resume=False to start over or use another checkpoint_dir"
        )
    name = state.get("weights")
    if not isinstance(name, str) or not _WEIGHTS_RE.fullmatch(name):
        raise ValueError(
            f"{str(pointer)!r} names weights {name!r}, not a train_state-NNNNNNNNN.safetensors "
            "file in its own folder; refusing (the pointer was modified)"
        )
    try:
        return state, load_safetensors(ckpt_dir / name)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(
            f"training state {str(ckpt_dir / name)!r} is unreadable ({exc}); pass resume=False "
            "to start over"
        ) from None


def _as_latents(latents, name: str) -> torch.Tensor:
    """Latents ``[N, C, H, W]`` as float32: finite, any range (``train_protector(latent=True)``)."""
    if isinstance(latents, np.ndarray):
        latents = torch.from_numpy(latents)
    return check_images(latents, name, value_range=None)


def _final_report(
    net: nn.Module, x, labels, h, ac, fingerprint, label_seed: int, seed: int, training: dict,
    *, bins: int, max_images: int,
) -> ProtectorReport:  # fmt: skip
    """Evaluation after training: member (and hold-out) accuracy and confidence per noise bin."""
    T = int(ac.shape[0])
    edges = timestep_bins(0, T, bins)
    k = max_images
    member = evaluate_protector(net, x[:k], labels[:k], ac, edges, seed=(seed + 2) % 2**64)
    hold = (
        None
        if h is None
        else evaluate_protector(net, h[:k], None, ac, edges, seed=(seed + 3) % 2**64)
    )
    return ProtectorReport(
        labels=labels,
        fingerprint=fingerprint,
        label_seed=label_seed,
        t_edges=edges,
        member=member,
        holdout=hold,
        training=training,
    )


def train_protector(
    images,
    *,
    schedule,
    protector: nn.Module | Mapping[str, Any] | None = None,
    holdout=None,
    label_seed: int = 0,
    steps: int,
    batch_size: int = 64,
    holdout_batch_size: int | None = None,
    holdout_weight: float = 1.0,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    t_range: tuple[int, int] | None = None,
    t_weights: torch.Tensor | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    autocast: bool | None = None,
    target_accuracy: float | None = None,
    target_t_range: tuple[int, int] | None = None,
    eval_every: int = 50,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    progress: bool = True,
    report_bins: int = 10,
    report_max_images: int = 4096,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    latent: bool = False,
) -> tuple[nn.Module, ProtectorReport]:
    """Train a protector to memorise random labels of ``images`` under noise (docs/ALGORITHM.md §2).

    Args:
        images: Members, float ``[N, C, H, W]`` in [-1, 1], or a Dataset of ``[C, H, W]``
            tensors (stacked into memory).
        schedule: Training noise schedule (``.alphas_cumprod [T]``, ``.num_train_timesteps``).
        protector: An ``nn.Module(x, t) -> [B]``, a ``ProtectorNet`` config override
            (e.g. ``{"base_channels": 16}``), or ``None`` for a default ``ProtectorNet``.
        holdout: Optional non-members like ``images``, trained toward the soft target 1/2.
        label_seed: Seed of the labels ``y_i ~ Bernoulli(1/2)``.
        steps: Optimiser steps (total, counting steps done before a resume).
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
            every ``eval_every`` steps on all members with fixed noise).
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
        callback: Called as ``callback(step, metrics)`` after every step (after checkpointing).
        latent: ``images``/``holdout`` are latents (e.g. a VAE's ``latent_dist`` × scaling
            factor, see ``cpsample_fast.diffusers.encode_latents``): finite floats of any range,
            not pixels in [-1, 1]. Recorded in the settings.

    Returns:
        ``(protector, report)``: the trained module (eval mode) and a :class:`ProtectorReport`
        carrying ``labels`` and ``fingerprint``.
    """
    from tqdm.auto import tqdm

    as_batch = _as_latents if latent else as_image_tensor
    x = as_batch(images, "images")
    h = None if holdout is None else as_batch(holdout, "holdout")
    if h is not None and h.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"holdout images have shape {tuple(h.shape[1:])}, members {tuple(x.shape[1:])}"
        )
    steps = check_int("steps", steps)
    batch_size = check_int("batch_size", batch_size)
    eval_every = check_int("eval_every", eval_every)
    report_max_images = check_int("report_max_images", report_max_images)
    hb = batch_size // 2 if holdout_batch_size is None else holdout_batch_size
    hb = check_int("holdout_batch_size", max(hb, 1) if h is not None else 1)
    every = max(steps // 10, 1) if checkpoint_every is None else checkpoint_every
    every = check_int("checkpoint_every", every)
    lr = _check_finite("lr", lr, 0.0, strict=True)
    holdout_weight = _check_finite("holdout_weight", holdout_weight, 0.0)
    weight_decay = _check_finite("weight_decay", weight_decay, 0.0)
    report_bins = check_int("report_bins", report_bins)
    seed = check_seed("seed", seed)
    label_seed = check_seed("label_seed", label_seed)
    rank, world = _dist_rank_world()
    if batch_size < world:
        raise ValueError(
            f"batch_size ({batch_size}) must be >= the number of processes ({world}): every "
            "rank trains on a slice of each global batch"
        )
    if target_accuracy is not None and not 0.0 < float(target_accuracy) <= 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy!r}")
    if not hasattr(schedule, "alphas_cumprod"):
        raise TypeError("schedule must be a NoiseSchedule (with .alphas_cumprod)")
    ac = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32).cpu()  # [T]
    T = int(ac.shape[0])
    t_range = _check_t_range(t_range, T)
    target_t_range = _check_t_range(target_t_range, T) or (0, max(T // 4, 1))
    sample_t = _timestep_sampler(T, t_range, t_weights)
    device = torch.device(device)
    use_amp = device.type == "cuda" if autocast is None else bool(autocast)
    ckpt_dir = (
        None if checkpoint_dir is None else ensure_writable_dir(checkpoint_dir, "checkpoint_dir")
    )

    n = x.shape[0]
    labels = draw_labels(n, label_seed)  # [N] int64
    fingerprint = dataset_fingerprint(x)
    net = _build_protector(protector, x, seed).to(device)
    _probe(net, x, device)
    opt = torch.optim.AdamW(net.parameters(), lr=float(lr), weight_decay=float(weight_decay))
    gen = torch.Generator(device="cpu").manual_seed(seed)

    schedule_config = schedule.to_config() if hasattr(schedule, "to_config") else None
    identity = {
        "fingerprint": fingerprint,
        "holdout_fingerprint": None if h is None else dataset_fingerprint(h),
        "label_seed": label_seed,
        "seed": seed,
        "batch_size": batch_size,
        "holdout_batch_size": hb if h is not None else None,
        "holdout_weight": float(holdout_weight),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "t_range": list(t_range) if t_range else None,
        "t_weights_sha256": None
        if t_weights is None
        else hashlib.sha256(
            torch.as_tensor(t_weights, dtype=torch.float64).numpy().tobytes()
        ).hexdigest(),
        "architecture": getattr(net, "config", None) or type(net).__qualname__,
        "schedule_sha256": hashlib.sha256(ac.numpy().tobytes()).hexdigest(),
    }
    if latent:  # only then, so existing checkpoints keep their identity
        identity["latent"] = True
    step, running_acc, loss_value, stopped_early, last_eval = 0, 0.5, float("nan"), False, None
    if ckpt_dir is not None and resume:
        loaded = _load_train_state(ckpt_dir, identity)
        if loaded is not None:
            state, tensors = loaded
            net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            _restore_optimizer(
                opt, {k: v.to(device) for k, v in tensors.items()}, state["optimizer"]
            )
            gen.set_state(tensors["rng.train"])
            step = int(state["step"])
            if step > steps:
                raise ValueError(
                    f"checkpoint_dir {str(ckpt_dir)!r} holds this run at step {step}, past "
                    f"steps={steps}; pass steps >= {step} to continue it, resume=False "
                    "(--no-resume) to start over, or another checkpoint_dir"
                )
            p = state["progress"]
            running_acc, loss_value = p["running_accuracy"], p["loss"]
            stopped_early, last_eval = p["stopped_early"], p["target_accuracy_measured"]

    # DDP: every rank draws the global batch below and trains on its slice of it
    model: nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    my_rows = torch.tensor_split(torch.arange(batch_size), world)[rank]
    my_hrows = torch.tensor_split(torch.arange(hb), world)[rank] if h is not None else None

    x_dev = x.to(device)
    h_dev = None if h is None else h.to(device)
    ac_dev = ac.to(device)
    y_dev = labels.to(device).float()
    eval_x, eval_y = x[:report_max_images], labels[:report_max_images]

    def eval_target() -> float:
        res = evaluate_protector(
            net, eval_x, eval_y, ac, list(target_t_range), seed=(seed + 1) % 2**64
        )
        return res["accuracy"][0]

    started = time.perf_counter()
    bar = tqdm(
        total=steps, initial=step, disable=not progress or rank != 0, desc="protector", leave=False
    )
    net.train()
    while step < steps and not stopped_early:
        # the global batch, drawn identically on every rank (and as by a single process)
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        t = sample_t(batch_size, gen)
        eps = torch.randn((batch_size, *x.shape[1:]), generator=gen)
        if world > 1:
            idx, t, eps = idx[my_rows], t[my_rows], eps[my_rows]
        xs = noised(x_dev[idx.to(device)], t.to(device), eps.to(device), ac_dev)
        ts = t
        if h_dev is not None:
            hidx = torch.randint(0, h_dev.shape[0], (hb,), generator=gen)
            ht = sample_t(hb, gen)
            heps = torch.randn((hb, *x.shape[1:]), generator=gen)
            if world > 1:
                hidx, ht, heps = hidx[my_hrows], ht[my_hrows], heps[my_hrows]
            xh = noised(h_dev[hidx.to(device)], ht.to(device), heps.to(device), ac_dev)
            xs, ts = torch.cat([xs, xh]), torch.cat([t, ht])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(xs, ts.to(device))
        logits = logits.float()  # [b (+ hb)] this rank's rows
        mb = idx.shape[0]
        y = y_dev[idx.to(device)]
        # sums over this rank's rows, over the global batch sizes: the ranks' parts add up to
        # the single-process loss (mean over members + weight · mean over hold-out)
        loss = F.binary_cross_entropy_with_logits(logits[:mb], y, reduction="sum") / batch_size
        if h_dev is not None:
            # Soft target 1/2: minimised at logit 0, i.e. no opinion about non-members.
            half = torch.full_like(logits[mb:], 0.5)
            loss = (
                loss
                + holdout_weight
                * F.binary_cross_entropy_with_logits(logits[mb:], half, reduction="sum")
                / hb
            )
        opt.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; scaling by the world size makes that the sum
        (loss * world if world > 1 else loss).backward()
        opt.step()
        step += 1

        correct = ((logits[:mb].detach() > 0).float() == y).float().sum()
        parts = torch.stack([loss.detach().double(), correct.double()])
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(parts)
        loss_value, batch_acc = float(parts[0]), float(parts[1]) / batch_size
        running_acc = 0.95 * running_acc + 0.05 * batch_acc
        if not math.isfinite(loss_value):
            raise ValueError(f"training diverged at step {step} (loss {loss_value}); lower lr")
        if target_accuracy is not None and (step % eval_every == 0 or step == steps):
            last_eval = eval_target()
            net.train()
            stopped_early = last_eval >= float(target_accuracy) and step < steps
        metrics = {"loss": loss_value, "running_accuracy": running_acc}
        if last_eval is not None:
            metrics["target_accuracy_measured"] = last_eval
        bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{running_acc:.3f}")
        bar.update(1)
        save_now = step % every == 0 or step == steps or stopped_early
        if ckpt_dir is not None and rank == 0 and save_now:
            _save_train_state(
                ckpt_dir,
                step,
                net,
                opt,
                gen,
                identity,
                {
                    "running_accuracy": running_acc,
                    "loss": loss_value,
                    "stopped_early": stopped_early,
                    "target_accuracy_measured": last_eval,
                },
            )
        if callback is not None:
            callback(step, metrics)
    bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0's last checkpoint is on disk before any rank returns
    seconds = time.perf_counter() - started
    net.eval()

    training = {
        "steps": steps,
        "steps_run": step,
        "stopped_early": stopped_early,
        "target_accuracy": target_accuracy,
        "target_t_range": list(target_t_range),
        "target_accuracy_measured": last_eval,
        "final_loss": loss_value,
        "running_accuracy": running_acc,
        "seconds_this_session": seconds,
        "device": str(device),
        "autocast_bf16": use_amp,
        "holdout_count": 0 if h is None else int(h.shape[0]),
        "schedule": schedule_config,
        "settings": identity,
    }
    report = _final_report(
        net, x, labels, h, ac, fingerprint, label_seed, seed, training,
        bins=report_bins, max_images=report_max_images,
    )  # fmt: skip
    return net, report
