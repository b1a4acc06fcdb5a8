"""Fused ops of one protected step, each a functional ``torch.library`` op (``cpsample::``).

- ``guided_update``: ``cpsample::guided_update``, x_t → x_{t'} (docs/ALGORITHM.md §3 steps 5–7);
- ``dpm_update``: ``cpsample::dpm_update``, one DPM-Solver++(2M) step (x_t, x̂0_prev) → (x_{t'}, x̂0);
- ``guidance_seed``: ``cpsample::guidance_seed``, logits → (VJP seed, confidence, gate).

``guided_update_spec`` is the plain-PyTorch function the kernels are tested against (no op,
no checks: what ``torch.compile`` inlines). Each op dispatches to a backend ("torch", "triton",
"cpp", "cuda"; "auto" picks the best available, see ``available_backends``). Importing this
package registers the ops.
"""

from ..constants import PREDICTION_TYPE_IDS
from ._backends import BACKENDS, available_backends, resolve_backend
from ._guided_update_op import guided_update
from ._torch import guided_update as guided_update_spec
from ._triton import has_triton
from .dpm_update import dpm_update
from .guidance_seed import guidance_seed

__all__ = [
    "BACKENDS",
    "PREDICTION_TYPE_IDS",
    "available_backends",
    "dpm_update",
    "guidance_seed",
    "guided_update",
    "guided_update_spec",
    "has_triton",
    "resolve_backend",
]
