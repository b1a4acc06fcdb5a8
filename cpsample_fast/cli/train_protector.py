"""``cpsample train-protector``: train a protector on a data set; write checkpoint + report.

Example: ``cpsample train-protector --data digits --n 64 --size 16 --holdout 64 --steps 1000
--out runs/digits``. Writes ``protector.safetensors`` + ``protector.json`` (weights, labels,
fingerprint), ``report.json`` and ``report.png`` into ``--out``; resumable training state lives
in ``--out/train_state`` (run the same command again after a kill to continue).

Under ``torchrun --nproc_per_node N -m cpsample_fast train-protector ...`` the training runs
data-parallel (DDP; gloo on CPU, NCCL on GPU) with the same result as one process; rank 0 writes
every file. The output folder is locked for the run, and the finished-run files (``result.json``
is written last) are removed at the first step trained, so a folder never looks finished while
a run is in it (a refused run leaves them alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import _args as A

# Files of a finished run; removed when a run starts (result.json is written last).
RESULT_FILES = (
    "result.json",
    "protector.safetensors",
    "protector.json",
    "report.json",
    "report.png",
)

HELP = (
    "Train a protector (time-conditioned classifier memorising random member labels) and write "
    "its checkpoint, report JSON and plot."
)

DATASETS = ("digits", "lfw", "folder", "npz")
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cpsample train-protector``."""
    d = parser.add_argument_group("data")
    d.add_argument("--data", required=True, choices=DATASETS, help="data source")
    d.add_argument("--path", help="image folder or .npz file (for --data folder / npz)")
    d.add_argument("--key", default=None, help="array name inside the .npz")
    d.add_argument(
        "--n", type=A.int_at_least(1), default=None, help="members (default: 64 digits, else all)"
    )
    d.add_argument(
        "--size", type=A.int_at_least(1), default=None, help="resize to SIZE×SIZE (digits: 16)"
    )
    d.add_argument("--offset", type=A.int_at_least(0), default=0, help="index of the first member")
    d.add_argument(
        "--holdout",
        type=A.int_at_least(0),
        default=0,
        help="non-members taken right after the members",
    )
    d.add_argument("--grayscale", action="store_true", help="folder images as 1 channel")
    d.add_argument(
        "--normalize", action="store_true", help="rescale min/max onto [-1, 1] (npz floats)"
    )
    d.add_argument(
        "--vae",
        default=None,
        metavar="DIR",
        help="local diffusers pipeline (vae/ inside) or AutoencoderKL directory: train a latent "
        "protector on the images' latents (latent_dist mean × scaling_factor, cached in --out); "
        "a pipeline's scheduler/scheduler_config.json then gives the noise schedule",
    )
    t = parser.add_argument_group("training")
    t.add_argument(
        "--steps", type=A.int_at_least(1), default=1000, help="optimiser steps (default 1000)"
    )
    t.add_argument(
        "--batch-size", type=A.int_at_least(1), default=64, help="members per step (default 64)"
    )
    t.add_argument(
        "--lr",
        type=A.finite_float(0.0, lo_open=True),
        default=2e-3,
        help="AdamW learning rate (default 2e-3)",
    )
    t.add_argument("--width", type=A.int_at_least(1), default=32, help="ProtectorNet base channels")
    t.add_argument(
        "--attention",
        type=A.int_at_least(1),
        nargs="*",
        default=[],
        metavar="RES",
        help="attention sizes",
    )
    t.add_argument(
        "--t-range",
        type=A.int_at_least(0),
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="train t in [LO, HI)",
    )
    t.add_argument(
        "--target-accuracy",
        type=A.finite_float(0.0, 1.0, lo_open=True),
        default=None,
        help="stop early at this",
    )
    t.add_argument(
        "--holdout-weight",
        type=A.finite_float(0.0),
        default=1.0,
        help="weight of the hold-out loss term (default 1)",
    )
    t.add_argument("--seed", type=A.seed, default=0, help="training seed (batches, noise, init)")
    t.add_argument("--label-seed", type=A.seed, default=0, help="seed of the member labels")
    t.add_argument("--schedule", choices=sorted(SCHEDULES), default="linear")
    t.add_argument("--num-train-timesteps", type=A.int_at_least(1), default=1000)
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    t.add_argument(
        "--checkpoint-every", type=A.int_at_least(1), default=None, help="steps between states"
    )
    t.add_argument("--no-resume", action="store_true", help="ignore --out/train_state")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--report-bins", type=A.int_at_least(1), default=10, help="timestep bins in the report"
    )
    parser.add_argument("--out", required=True, help="output folder")


# Options that are ``ProtectorTrainConfig`` fields of the same name (their ``dest``).
CONFIG_OPTIONS = (
    "steps", "batch_size", "lr", "t_range", "target_accuracy", "holdout_weight", "seed",
    "label_seed", "checkpoint_every", "report_bins",
)  # fmt: skip


def training_config(args, device, checkpoint_dir: Path):
    """The ``ProtectorTrainConfig`` of these options (resumable state in ``checkpoint_dir``)."""
    from ..protector import ProtectorTrainConfig

    return ProtectorTrainConfig(
        **{name: getattr(args, name) for name in CONFIG_OPTIONS},
        device=device,
        checkpoint_dir=checkpoint_dir,
        resume=not args.no_resume,
        progress=not args.no_progress,
        latent=bool(args.vae),
    )


def _load_data(args):
    """(members, holdout or None) from the CLI options."""
    from ..data import load_digits, load_image_folder, load_lfw_subset, load_npz, normalize_images

    extra = max(args.holdout, 0)
    n = args.n
    if args.data == "digits":
        n = 64 if n is None else n
        size = 16 if args.size is None else args.size
        images = load_digits(n + extra, size=size, offset=args.offset)
    elif args.data == "lfw":
        images = load_lfw_subset(None if n is None else n + extra, args.size, args.offset)
    else:
        if not args.path:
            raise ValueError(f"--data {args.data} needs --path")
        path = Path(args.path)
        total = None if n is None else n + extra
        if args.data == "folder":
            images = load_image_folder(
                path,
                n=total,
                size=args.size,
                offset=args.offset,
                mode="L" if args.grayscale else "RGB",
            )
            if args.normalize:
                images = normalize_images(images)
        else:
            images = load_npz(
                path,
                args.key,
                n=total,
                size=args.size,
                offset=args.offset,
                normalize=args.normalize,
            )
    if extra and images.shape[0] <= extra:
        raise ValueError(f"--holdout {extra} leaves no members out of {images.shape[0]} images")
    if extra:
        return images[:-extra], images[-extra:]
    return images, None


def _latents(args, out, members, holdout, device):
    """Encode members/holdout through ``--vae`` once (cached); the pipeline's schedule."""
    from ..diffusers.latents import encode_latents
    from ..integrations.diffusers import _require_diffusers
    from ..io import read_json
    from ..schedule import NoiseSchedule

    diffusers = _require_diffusers()
    root = Path(args.vae)
    vae_dir = root / "vae" if (root / "vae" / "config.json").is_file() else root
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"--vae: no config.json in {str(root)!r} or its vae/ folder")
    vae = diffusers.AutoencoderKL.from_pretrained(
        vae_dir, local_files_only=True, use_safetensors=True
    )
    vae = vae.eval().requires_grad_(False).to(device)
    kw = dict(progress=not args.no_progress)
    members = encode_latents(vae, members, cache=out / "latents.safetensors", **kw)
    if holdout is not None:
        holdout = encode_latents(vae, holdout, cache=out / "holdout_latents.safetensors", **kw)
    sched_file = root / "scheduler" / "scheduler_config.json"
    schedule = None
    if sched_file.is_file():
        schedule = NoiseSchedule.from_diffusers(read_json(sched_file))
    return members, holdout, schedule


def main(args) -> int:
    """Run ``cpsample train-protector``; 0 on success (bad input: ``cli/__main__`` exits 2)."""
    from ..distributed import RankInfo, all_agree, init_process_group

    info = RankInfo.from_env()
    device = info.device(args.device or "auto")
    own_group = init_process_group(info, device)
    try:  # bad input propagates to the one handler in cli/__main__ (one line, exit 2)
        return _run(args, info, device, all_agree)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, info, device, all_agree) -> int:
    from ..io import ensure_writable_dir, write_json_atomic
    from ..protector import save_protector, train_protector
    from ..schedule import NoiseSchedule
    from ..shards import OutputLock

    out = ensure_writable_dir(args.out, "--out")
    members, holdout = _load_data(args)
    schedule = NoiseSchedule(args.num_train_timesteps, beta_schedule=SCHEDULES[args.schedule])
    if args.vae:
        members, holdout, vae_schedule = _latents(args, out, members, holdout, device)
        schedule = vae_schedule or schedule
    lock = OutputLock(out, "--out")
    refusal = None
    if info.rank == 0:
        try:
            lock.acquire()
        except ValueError as err:
            refusal = err
    if not all_agree(info, refusal is None):
        raise refusal or ValueError("rank 0 refused the run; see its message")
    cleared: list[bool] = []

    def clear_finished(step: int, metrics: dict) -> None:
        # at the first step actually trained (not before: a refused run keeps the old files),
        # the previous run's result files go, so the folder never looks finished mid-run
        if not cleared and info.rank == 0:
            for name in RESULT_FILES:
                (out / name).unlink(missing_ok=True)
        cleared.append(True)

    try:
        net, report = train_protector(
            members,
            schedule=schedule,
            protector={"base_channels": args.width, "attention_resolutions": args.attention},
            holdout=holdout,
            config=training_config(args, device, out / "train_state"),
            callback=clear_finished,
        )
        if info.rank != 0:
            return 0
        weights = save_protector(out / "protector.safetensors", net, report)
        report.to_json(out / "report.json")
        report.plot(out / "report.png")
        print(report.summary())
        result = {
            "protector": str(weights),
            "sidecar": str(weights.with_suffix(".json")),
            "report_json": str(out / "report.json"),
            "report_png": str(out / "report.png"),
            "members": int(members.shape[0]),
            "holdout": 0 if holdout is None else int(holdout.shape[0]),
            "steps_run": report.training["steps_run"],
            "world_size": info.world_size,
            "acting_range_95": report.acting_range(),
            "latent": bool(args.vae),
            "schedule": schedule.to_config(),
        }
        write_json_atomic(out / "result.json", result)  # last: the run is finished
        print(json.dumps(result))
        return 0
    finally:
        lock.release()
