"""The guidance term G of one fast step (docs/ALGORITHM.md §3 steps 2–5), free of host syncs.

The protector's forward, one vector-Jacobian product of its logits (input gradient only; the
weights get none) seeded by the ``cpsample::guidance_seed`` op, and the scaling by
``s·√(1-ᾱ_t)`` in float32. ``CPSampler`` calls it once per guided step, eager or compiled.
"""

from __future__ import annotations

import torch

from . import ops
from .validation import check_protector_output


def scaled_guidance(g: torch.Tensor, scale_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``G = scale_t · g`` as a row-major float32 tensor like ``x``, in one pass over ``g``.

    A channels_last protector (or one in bf16) returns its input gradient channels_last; the
    fused update reads row-major memory, so the layout change is folded into the scaling the
    step needs anyway instead of costing a copy inside the op. Compiled, inductor fuses the
    product and the layout change into one kernel.
    """
    if torch.compiler.is_compiling():
        return (g.float() * scale_t).contiguous()
    if g.dtype != torch.float32:
        g = g.float()  # bf16/fp16 products would round to the low precision
    return torch.mul(g, scale_t, out=torch.empty(x.shape, dtype=torch.float32, device=x.device))


def guidance_term(prot_call, x, t, scale_t, one, alpha: float, mode_id: int, *, seed_backend):
    """``(logits f, confidence q, gate m, G, finite(f))`` of one step at ``x`` ``[B, ...]``.

    ``prot_call`` is the protector (a ``ModelCaller``), ``t`` int64 ``[B]``, ``scale_t`` the 0-dim
    float32 ``s·√(1-ᾱ_t)`` and ``one`` a 0-dim float32 1 on x's device. The seed op gets scale 1
    and G is scaled afterwards, in float32: seeding with the scaled ``c_b`` would push values
    ~1e3 times larger through a low-precision protector's backward (fp16 overflows to inf).
    """
    B = x.shape[0]

    def logits_of(x_in):
        return check_protector_output(prot_call(x_in, t), B, None, None).float()

    if torch.compiler.is_compiling():
        # torch.func.vjp traces into one fullgraph (autograd.grad would break the graph)
        f, vjp_fn = torch.func.vjp(logits_of, x)
        c, q, m = ops.guidance_seed(f, one, alpha, mode_id, backend=seed_backend)
        (g,) = vjp_fn(c)
    else:
        # eager: plain autograd is faster than functorch's vjp for the protector's
        # forward+backward (about 10-15 % on the CPU)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            f = logits_of(x_in)
            c, q, m = ops.guidance_seed(f.detach(), one, alpha, mode_id, backend=seed_backend)
            (g,) = torch.autograd.grad(f, x_in, grad_outputs=c)
        f = f.detach()
    return f, q, m, scaled_guidance(g, scale_t, x), torch.isfinite(f).all()
