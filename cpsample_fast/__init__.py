"""cpsample_fast: fast, tested CPSample (Kazdan et al., ICLR 2025, arXiv 2409.07025).

Public names follow docs/ALGORITHM.md §5. The evaluation, model and integration subpackages are
imported on first use (``cps.eval``), so ``import cpsample_fast`` stays light.
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .protector import ProtectorNet, load_protector, save_protector, train_protector
from .reference import reference_sample
from .sampler import CPSampler
from .schedule import NoiseSchedule

_LAZY_SUBMODULES = ("eval", "models", "integrations", "distributed", "bench")

__all__ = [
    "CPSampler",
    "NoiseSchedule",
    "ProtectorNet",
    "__version__",
    "eval",
    "load_protector",
    "reference_sample",
    "save_protector",
    "train_protector",
    "tune_guidance",
]


def __getattr__(name: str):
    if name in ("tune_guidance", "Targets"):
        from . import tune

        return getattr(tune, name)
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'cpsample_fast' has no attribute {name!r}")
