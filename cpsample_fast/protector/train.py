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

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import as_image_tensor, check_images
from ..io import ensure_writable_dir
from ..resume import check_resume_step
from .checkpoint import TRAIN_STATE_FORMAT, load_train_state, save_train_state
from .config import ProtectorTrainConfig, timestep_sampler
from .labels import dataset_fingerprint, draw_labels
from .model import ProtectorNet
from .report import ProtectorReport, evaluate_protector, final_report, noised

__all__ = ["TRAIN_STATE_FORMAT", "ProtectorTrainConfig", "train_protector"]


def _dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def _as_latents(latents, name: str) -> torch.Tensor:
    """Latents ``[N, C, H, W]`` as float32: finite, any range (``train_protector(latent=True)``)."""
    if isinstance(latents, np.ndarray):
        latents = torch.from_numpy(latents)
    return check_images(latents, name, value_range=None)


@dataclass
class _Data:
    """The checked training inputs (CPU): members, their labels and fingerprint, hold-out, ᾱ."""

    x: torch.Tensor  # [N, C, H, W] float32
    labels: torch.Tensor  # [N] int64
    fingerprint: dict[str, Any]
    holdout: torch.Tensor | None  # [M, C, H, W] float32
    ac: torch.Tensor  # [T] float32


def _load_data(images, holdout, schedule, cfg: ProtectorTrainConfig) -> _Data:
    as_batch = _as_latents if cfg.latent else as_image_tensor
    x = as_batch(images, "images")
    h = None if holdout is None else as_batch(holdout, "holdout")
    if h is not None and h.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"holdout images have shape {tuple(h.shape[1:])}, members {tuple(x.shape[1:])}"
        )
    if not hasattr(schedule, "alphas_cumprod"):
        raise TypeError("schedule must be a NoiseSchedule (with .alphas_cumprod)")
    ac = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32).cpu()  # [T]
    labels = draw_labels(x.shape[0], cfg.label_seed)  # [N] int64
    return _Data(x, labels, dataset_fingerprint(x), h, ac)


def _identity(data: _Data, cfg: ProtectorTrainConfig, net: nn.Module) -> dict[str, Any]:
    """Every setting a resumed run must share with the stored one (all but ``steps``)."""
    identity = {
        "fingerprint": data.fingerprint,
        "holdout_fingerprint": None if data.holdout is None else dataset_fingerprint(data.holdout),
        "label_seed": cfg.label_seed,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "holdout_batch_size": cfg.holdout_batch_size,
        "holdout_weight": cfg.holdout_weight,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "t_range": list(cfg.t_range) if cfg.t_range else None,
        "t_weights_sha256": None
        if cfg.t_weights is None
        else hashlib.sha256(
            torch.as_tensor(cfg.t_weights, dtype=torch.float64).numpy().tobytes()
        ).hexdigest(),
        "architecture": getattr(net, "config", None) or type(net).__qualname__,
        "schedule_sha256": hashlib.sha256(data.ac.numpy().tobytes()).hexdigest(),
    }
    if cfg.latent:  # only then, so existing checkpoints keep their identity
        identity["latent"] = True
    return identity


@dataclass
class _Progress:
    """Where the loop stands; all but ``step`` is stored in the training state's pointer."""

    step: int = 0
    running_accuracy: float = 0.5
    loss: float = math.nan
    stopped_early: bool = False
    target_accuracy_measured: float | None = None

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "step"}


class _Batches:
    """Draws each step's global batch from ``gen`` (identically on every rank, and as one process
    would) and keeps this rank's rows of it, noised (docs/ALGORITHM.md §2)."""

    def __init__(self, data: _Data, cfg: ProtectorTrainConfig, rank: int, world: int) -> None:
        device = cfg.device
        self.cfg, self.world, self.device = cfg, world, device
        self.sample_t = timestep_sampler(int(data.ac.shape[0]), cfg.t_range, cfg.t_weights)
        self.x = data.x.to(device)
        self.h = None if data.holdout is None else data.holdout.to(device)
        self.ac = data.ac.to(device)
        self.y = data.labels.to(device).float()
        self.rows = torch.tensor_split(torch.arange(cfg.batch_size), world)[rank]
        self.hrows = (
            None
            if self.h is None
            else torch.tensor_split(torch.arange(cfg.holdout_batch_size), world)[rank]
        )

    def _draw(self, images, n: int, rows, gen: torch.Generator):
        idx = torch.randint(0, images.shape[0], (n,), generator=gen)
        t = self.sample_t(n, gen)
        eps = torch.randn((n, *images.shape[1:]), generator=gen)
        if self.world > 1:
            idx, t, eps = idx[rows], t[rows], eps[rows]
        d = self.device
        return idx, t, noised(images[idx.to(d)], t.to(d), eps.to(d), self.ac)

    def draw(self, gen: torch.Generator):
        """``(x_t, t, y)``: this rank's member rows, then its hold-out rows (``y``: members')."""
        idx, t, xs = self._draw(self.x, self.cfg.batch_size, self.rows, gen)
        if self.h is not None:
            _, ht, xh = self._draw(self.h, self.cfg.holdout_batch_size, self.hrows, gen)
            xs, t = torch.cat([xs, xh]), torch.cat([t, ht])
        return xs, t.to(self.device), self.y[idx.to(self.device)]


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: ProtectorTrainConfig) -> torch.Tensor:
    """This rank's part of the global-batch loss: BCE of the member rows against ``y`` plus
    ``holdout_weight`` × BCE of the hold-out rows against 1/2.

    Sums over this rank's rows divided by the global batch sizes: the ranks' parts add up to
    the single-process loss (mean over members + weight · mean over hold-out).
    """
    mb = y.shape[0]
    loss = F.binary_cross_entropy_with_logits(logits[:mb], y, reduction="sum") / cfg.batch_size
    if cfg.holdout_batch_size is not None:  # set exactly when there is a hold-out set
        # Soft target 1/2: minimised at logit 0, i.e. no opinion about non-members.
        half = torch.full_like(logits[mb:], 0.5)
        hold = F.binary_cross_entropy_with_logits(logits[mb:], half, reduction="sum")
        loss = loss + cfg.holdout_weight * hold / cfg.holdout_batch_size
    return loss


def _all_reduce_sum(parts: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(parts)
    return parts


def _fit(
    net: nn.Module,
    data: _Data,
    cfg: ProtectorTrainConfig,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    prog: _Progress,
    save: Callable[[_Progress], None] | None,
    callback: Callable[[int, dict[str, float]], None] | None,
) -> _Progress:
    """The training loop from ``prog.step`` to ``cfg.steps`` (or the early stop)."""
    from tqdm.auto import tqdm

    rank, world = _dist_rank_world()
    model = net
    if world > 1:  # every rank draws the global batch and trains on its slice of it
        from torch.nn.parallel import DistributedDataParallel

        ids = [cfg.device.index] if cfg.device.type == "cuda" else None
        model = DistributedDataParallel(net, device_ids=ids)
    batches = _Batches(data, cfg, rank, world)
    k = cfg.report_max_images
    eval_x, eval_y = data.x[:k], data.labels[:k]
    bar = tqdm(total=cfg.steps, initial=prog.step, disable=not cfg.progress or rank != 0,
               desc="protector", leave=False)  # fmt: skip
    net.train()
    while prog.step < cfg.steps and not prog.stopped_early:
        xs, ts, y = batches.draw(gen)
        with torch.autocast(cfg.device.type, dtype=torch.bfloat16, enabled=cfg.use_autocast):
            logits = model(xs, ts)
        logits = logits.float()  # [b (+ hb)] this rank's rows
        loss = _loss(logits, y, cfg)
        opt.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; scaling by the world size makes that the sum
        (loss * world if world > 1 else loss).backward()
        opt.step()
        prog.step += 1

        correct = ((logits[: y.shape[0]].detach() > 0).float() == y).float().sum()
        parts = _all_reduce_sum(torch.stack([loss.detach().double(), correct.double()]), world)
        prog.loss = float(parts[0])
        batch_accuracy = float(parts[1]) / cfg.batch_size
        prog.running_accuracy = 0.95 * prog.running_accuracy + 0.05 * batch_accuracy
        if not math.isfinite(prog.loss):
            raise ValueError(f"training diverged at step {prog.step} (loss {prog.loss}); lower lr")
        if cfg.target_accuracy is not None and (
            prog.step % cfg.eval_every == 0 or prog.step == cfg.steps
        ):
            prog.target_accuracy_measured = evaluate_protector(
                net, eval_x, eval_y, data.ac, list(cfg.target_t_range), seed=(cfg.seed + 1) % 2**64
            )["accuracy"][0]
            net.train()
            prog.stopped_early = (
                prog.target_accuracy_measured >= cfg.target_accuracy and prog.step < cfg.steps
            )
        bar.set_postfix(loss=f"{prog.loss:.4f}", acc=f"{prog.running_accuracy:.3f}")
        bar.update(1)
        if (
            save is not None
            and rank == 0
            and (
                prog.step % cfg.checkpoint_every == 0
                or prog.step == cfg.steps
                or prog.stopped_early
            )
        ):
            save(prog)
        if callback is not None:
            metrics = {"loss": prog.loss, "running_accuracy": prog.running_accuracy}
            if prog.target_accuracy_measured is not None:
                metrics["target_accuracy_measured"] = prog.target_accuracy_measured
            callback(prog.step, metrics)
    bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0's last checkpoint is on disk before any rank returns
    net.eval()
    return prog


def _resume(
    ckpt_dir: Path | None,
    cfg: ProtectorTrainConfig,
    identity: dict,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> _Progress:
    """The stored progress (weights, optimiser and generator restored), or a fresh start."""
    if ckpt_dir is None or not cfg.resume:
        return _Progress()
    state = load_train_state(ckpt_dir, identity, net, opt, gen)
    if state is None:
        return _Progress()
    step = check_resume_step(
        int(state["step"]), cfg.steps, where=f"checkpoint_dir {str(ckpt_dir)!r}",
        retry="checkpoint_dir", start_over="resume=False (--no-resume)",
    )  # fmt: skip
    return _Progress(step=step, **state["progress"])


def train_protector(
    images,
    *,
    schedule,
    protector: nn.Module | Mapping[str, Any] | None = None,
    holdout=None,
    config: ProtectorTrainConfig | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    **settings: Any,
) -> tuple[nn.Module, ProtectorReport]:
    """Train a protector to memorise random labels of ``images`` under noise (docs/ALGORITHM.md §2).

    Args:
        images: Members, float ``[N, C, H, W]`` in [-1, 1] (any finite range with
            ``latent=True``), or a Dataset of ``[C, H, W]`` tensors (stacked into memory).
        schedule: Training noise schedule (``.alphas_cumprod [T]``, ``.num_train_timesteps``).
        protector: An ``nn.Module(x, t) -> [B]``, a ``ProtectorNet`` config override
            (e.g. ``{"base_channels": 16}``), or ``None`` for a default ``ProtectorNet``.
        holdout: Optional non-members like ``images``, trained toward the soft target 1/2.
        config: A :class:`ProtectorTrainConfig`; ``settings`` override its fields.
        callback: Called as ``callback(step, metrics)`` after every step (after checkpointing).
        **settings: The fields of :class:`ProtectorTrainConfig` by name (``steps`` is required
            without ``config``): ``steps``, ``batch_size``, ``lr``, ``label_seed``, ``seed``,
            ``t_range``, ``checkpoint_dir``, ``target_accuracy``, ``latent``, ...

    Returns:
        ``(protector, report)``: the trained module (eval mode) and a :class:`ProtectorReport`
        carrying ``labels`` and ``fingerprint``.
    """
    cfg = ProtectorTrainConfig.from_kwargs(config, **settings)
    data = _load_data(images, holdout, schedule, cfg)
    rank, world = _dist_rank_world()
    cfg = cfg.resolve(int(data.ac.shape[0]), has_holdout=data.holdout is not None, world=world)
    ckpt_dir = (
        None
        if cfg.checkpoint_dir is None
        else ensure_writable_dir(cfg.checkpoint_dir, "checkpoint_dir")
    )
    net = _build_protector(protector, data.x, cfg.seed).to(cfg.device)
    _probe(net, data.x, cfg.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    identity = _identity(data, cfg, net)
    prog = _resume(ckpt_dir, cfg, identity, net, opt, gen)

    def save(p: _Progress) -> None:
        save_train_state(ckpt_dir, p.step, net, opt, gen, identity, p.state())

    started = time.perf_counter()
    prog = _fit(net, data, cfg, opt, gen, prog, None if ckpt_dir is None else save, callback)
    training = {
        "steps": cfg.steps,
        "steps_run": prog.step,
        "stopped_early": prog.stopped_early,
        "target_accuracy": cfg.target_accuracy,
        "target_t_range": list(cfg.target_t_range),
        "target_accuracy_measured": prog.target_accuracy_measured,
        "final_loss": prog.loss,
        "running_accuracy": prog.running_accuracy,
        "seconds_this_session": time.perf_counter() - started,
        "device": str(cfg.device),
        "autocast_bf16": cfg.use_autocast,
        "holdout_count": 0 if data.holdout is None else int(data.holdout.shape[0]),
        "schedule": schedule.to_config() if hasattr(schedule, "to_config") else None,
        "settings": identity,
    }
    report = final_report(
        net, data.x, data.labels, data.holdout, data.ac, fingerprint=data.fingerprint,
        label_seed=cfg.label_seed, seed=cfg.seed, training=training, bins=cfg.report_bins,
        max_images=cfg.report_max_images,
    )  # fmt: skip
    return net, report
