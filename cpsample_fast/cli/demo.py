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


# The plain options as (type, help) per group; their defaults are DemoConfig's, in one place.
_OPTIONS = {
    "sampling": {
        "n": (int, "samples per sampler (default %(default)s)"),
        "steps": (int, "DDIM steps (default %(default)s)"),
        "seed": (int, "noise seed shared by both samplers"),
        "scale": (float, "guidance scale s"),
        "alpha": (float, "gate threshold α"),
        "backend": (str, "CPSampler backend"),
        "rejection_budget": (
            int,
            "draw budget of the rejection-sampling baseline (default 2 x --n; 0 skips it)",
        ),
    },
    "audit": {
        "n_nonmembers": (int, "held-out digits used as non-members in the membership attack"),
        "feature_steps": (
            int,
            "training steps of the Fréchet feature network (default %(default)s)",
        ),
        "blur_sigma": (
            float,
            "Gaussian blur (pixels) of the near-copy audit, on samples and members alike",
        ),
    },
    "models": {
        "unet_steps": (int, "UNet steps with --train"),
        "protector_steps": (int, "protector steps with --train"),
    },
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--out", default=str(d.out), help="output folder (default %(default)s)")
    groups = {name: p.add_argument_group(name) for name in _OPTIONS}
    for group, options in _OPTIONS.items():
        for name, (kind, text) in options.items():
            flag = "--" + name.replace("_", "-")
            groups[group].add_argument(flag, type=kind, default=getattr(d, name), help=text)
    groups["sampling"].add_argument("--mode", default=d.mode, choices=MODES)
    groups["sampling"].add_argument(
        "--guidance-range",
        type=int,
        nargs=2,
        default=d.guidance_range,
        metavar=("T_MIN", "T_MAX"),
        help="inclusive timesteps where guidance acts (default from the tuned settings)",
    )
    groups["audit"].add_argument("--thresholds", type=float, nargs="+", default=list(d.thresholds))
    groups["audit"].add_argument(
        "--attack-timesteps", type=int, nargs="+", default=list(d.attack_timesteps)
    )
    groups["models"].add_argument(
        "--train",
        action="store_true",
        help="train the eps-model and protector here instead of loading the shipped "
        "weights (UNet ~25 min, protector ~2 min on one CPU thread)",
    )


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
