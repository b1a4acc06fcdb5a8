"""Reproduce the shipped digits protector (``cpsample_fast/assets/digits_protector.*``).

Exact command that produced the shipped weights (one CPU thread, ~2 min on a shared 2-core box):

    OMP_NUM_THREADS=1 nice .venv/bin/python scripts/train_digits_protector.py --steps 1500

It protects exactly the member digits of ``cpsample_fast.models.digits_split()`` (the training set
of the shipped memorising UNet), with the protector hold-out digits as soft-target-1/2
non-members; the evaluation digits are never shown to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from cpsample_fast.models.digits import ASSET_DIR, digits_split  # noqa: E402
from cpsample_fast.protector import save_protector, train_protector  # noqa: E402
from cpsample_fast.schedule import NoiseSchedule  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ASSET_DIR / "digits_protector.safetensors"))
    args = p.parse_args()
    split = digits_split()
    protector, report = train_protector(
        split.members,
        schedule=NoiseSchedule(),
        protector={"base_channels": args.base_channels},  # seeded init inside
        holdout=split.holdout,
        steps=args.steps,
        batch_size=64,
        lr=2e-3,
        seed=args.seed,
    )
    print(report.summary())
    path = save_protector(args.out, protector, report)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
