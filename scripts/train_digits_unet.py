"""Reproduce the shipped memorising digits ε-model (``cpsample_fast/assets/digits_unet.*``).

Exact command that produced the shipped weights (2 shared CPU cores, one thread, ~25 min):

    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/train_digits_unet.py \
        --steps 8000 --batch-size 32 --lr 1e-3 --seed 0 --members 32

Training checkpoints (model + EMA + optimiser, safetensors) go to ``--workdir`` and the run
resumes from them; the shipped file holds only the EMA weights in float16 (~2 MB).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from cpsample_fast.models import load_checkpoint, save_checkpoint, train_diffusion
from cpsample_fast.models.digits import DIGITS_UNET, digits_split
from cpsample_fast.models.unet import UNET_CONFIGS, SmallUNet

# diffusers' DDIMScheduler defaults (linear betas 1e-4 → 0.02 over 1000 steps).
SCHEDULE_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}


def make_schedule():
    """The training schedule: ``cpsample_fast.NoiseSchedule`` when available, else its ᾱ."""
    try:
        from cpsample_fast.schedule import NoiseSchedule

        return NoiseSchedule(**SCHEDULE_CONFIG)
    except ImportError:
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
        return torch.cumprod(1.0 - betas, dim=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--members", type=int, default=32)
    p.add_argument("--config", default="digits", choices=sorted(UNET_CONFIGS))
    p.add_argument("--workdir", default="build/digits_unet", help="resumable training state")
    p.add_argument("--out", default=str(DIGITS_UNET))
    args = p.parse_args()

    torch.manual_seed(args.seed)
    split = digits_split(n_members=args.members)
    model = SmallUNet(args.config)
    meta = {
        "unet_config": model.config.to_dict(),
        "schedule": SCHEDULE_CONFIG,
        "split": {"n_members": args.members, "n_holdout": 256, "n_eval": 512, "seed": 0},
        "member_index": split.member_index.tolist(),
        "command": "OMP_NUM_THREADS=1 nice .venv/bin/python " + shlex.join(sys.argv),
        "data": "sklearn digits /16, bilinear 8->16, mapped to [-1, 1]",
    }
    ckpt = Path(args.workdir) / "train.safetensors"
    model, report = train_diffusion(
        model,
        split.members,
        make_schedule(),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint=ckpt,
        checkpoint_every=500,
        meta=meta,
    )
    _, full = load_checkpoint(ckpt)
    meta["losses"] = full.get("losses", [])
    meta["steps"] = report.steps
    half = {k: v.half() if v.dtype.is_floating_point else v for k, v in model.state_dict().items()}
    model16 = SmallUNet(model.config)
    model16.load_state_dict({k: v.float() for k, v in half.items()})
    save_checkpoint(args.out, model16.half(), meta)
    print(
        f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB), "
        f"final loss {meta['losses'][-1][1]:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
