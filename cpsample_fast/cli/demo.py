"""``cpsample demo``: CPSample against plain DDIM on a memorising digits model, in one table.

The computation is :func:`cpsample_fast.eval.demo.run_demo` (see its module for what the demo
measures); this module parses the options into a :class:`~cpsample_fast.eval.demo.DemoConfig`,
runs it and prints the table. Writes ``report.json``, PNGs and the samples into ``--out``.
"""

from __future__ import annotations

import argparse
import sys

from ..eval.demo import (  # noqa: F401 - the demo's constants, importable from here as before
    BLUR_SIGMA,
    DEFAULT_ALPHA,
    DEFAULT_GUIDANCE_RANGE,
    DEFAULT_MODE,
    DEFAULT_SCALE,
    DEFAULT_THRESHOLDS,
    FALLBACK_ALPHA,
    FALLBACK_MODE,
    FALLBACK_SCALE,
    GUIDANCE_SETTINGS,
    PRIMARY_THRESHOLD,
    PROTECTOR_ASSET,
    DemoConfig,
    _assets,
    load_or_train_models,
    shipped_settings,
)
from ..guidance import MODES

HELP = "CPSample vs plain DDIM on a memorising digits model: replication, quality, membership"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    _sampling_arguments(p.add_argument_group("sampling"))
    _audit_arguments(p.add_argument_group("audit"))
    _model_arguments(p.add_argument_group("models"))


def _sampling_arguments(g) -> None:
    g.add_argument("--n", type=int, default=128, help="samples per sampler (default 128)")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--seed", type=int, default=0, help="noise seed shared by both samplers")
    g.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="guidance scale s")
    g.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="gate threshold α")
    g.add_argument("--mode", default=DEFAULT_MODE, choices=MODES)
    g.add_argument("--backend", default="auto", help="CPSampler backend")
    g.add_argument(
        "--guidance-range",
        type=int,
        nargs=2,
        default=DEFAULT_GUIDANCE_RANGE,
        metavar=("T_MIN", "T_MAX"),
        help="inclusive timesteps where guidance acts (default from the tuned settings)",
    )
    g.add_argument(
        "--rejection-budget",
        type=int,
        default=None,
        help="draw budget of the rejection-sampling baseline (default 2 x --n; 0 skips it)",
    )


def _audit_arguments(g) -> None:
    g.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    g.add_argument(
        "--n-nonmembers",
        type=int,
        default=64,
        help="held-out digits used as non-members in the membership attack",
    )
    g.add_argument("--attack-timesteps", type=int, nargs="+", default=[50, 100, 200])
    g.add_argument(
        "--feature-steps",
        type=int,
        default=200,
        help="training steps of the Fréchet feature network (default 200)",
    )
    g.add_argument(
        "--blur-sigma",
        type=float,
        default=BLUR_SIGMA,
        help="Gaussian blur (pixels) of the near-copy audit, on samples and members alike",
    )


def _model_arguments(g) -> None:
    g.add_argument(
        "--train",
        action="store_true",
        help="train the eps-model and protector here instead of loading the shipped "
        "weights (UNet ~25 min, protector ~2 min on one CPU thread)",
    )
    g.add_argument("--unet-steps", type=int, default=8000, help="UNet steps with --train")
    g.add_argument("--protector-steps", type=int, default=1500, help="protector steps with --train")


def config_from_args(args) -> DemoConfig:
    """The :class:`DemoConfig` of parsed options (every field is an option of the same name)."""
    fields = DemoConfig.__dataclass_fields__
    return DemoConfig(**{k: getattr(args, k) for k in fields if hasattr(args, k)})


def main(args) -> int:
    from ..eval.demo import run_demo

    def log(msg: str) -> None:
        print(f"[demo] {msg}", file=sys.stderr, flush=True)

    result = run_demo(config_from_args(args), log=log)
    print(result.table())
    return 0


__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_GUIDANCE_RANGE", "DEFAULT_MODE", "DEFAULT_SCALE",
    "GUIDANCE_SETTINGS", "HELP", "PRIMARY_THRESHOLD", "PROTECTOR_ASSET", "DemoConfig", "_assets",
    "add_arguments", "config_from_args", "load_or_train_models", "main", "shipped_settings",
]  # fmt: skip
