"""CPSample as a diffusers drop-in: ``pipe.scheduler = ProtectedScheduler(pipe.scheduler, ...)``.

The package imports without diffusers; the pipeline classes import it when first used.
"""

from __future__ import annotations

from .latents import encode_latents
from .scheduler import SUPPORTED_SCHEDULERS, ProtectedScheduler, check_scheduler

__all__ = [
    "SUPPORTED_SCHEDULERS",
    "CPSamplePipeline",
    "ProtectedScheduler",
    "check_scheduler",
    "encode_latents",
]


def __getattr__(name):
    if name == "CPSamplePipeline":
        from .pipeline import CPSamplePipeline

        return CPSamplePipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
