"""Fused ops of one protected step, each a functional ``torch.library`` op (``cpsample::``).

- ``guided_update``: ``cpsample::guided_update``, x_t → x_{t'} (docs/ALGORITHM.md §3 steps 5–7);
- ``dpm_update``: ``cpsample::dpm_update``, one DPM-Solver++(2M) step (x_t, x̂0_prev) → (x_{t'}, x̂0);
- ``guidance_seed``: ``cpsample::guidance_seed``, logits → (VJP seed, confidence, gate).

Each dispatches to a backend ("torch", "triton", "cpp", "cuda"; "auto" picks the best available,
see ``available_backends``). Importing this package registers the ops.
"""

from ._triton import has_triton
from .dpm_update import dpm_update
from .guidance_seed import guidance_seed
from .guided_update import (
    BACKENDS,
    PREDICTION_TYPES,
    available_backends,
    guided_update,
    resolve_backend,
)

__all__ = [
    "BACKENDS",
    "PREDICTION_TYPES",
    "available_backends",
    "dpm_update",
    "guidance_seed",
    "guided_update",
    "has_triton",
    "resolve_backend",
]
