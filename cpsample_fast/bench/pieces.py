"""Where a step's time goes: the eps-model, the protector's forward + backward and the fused
update, each timed alone at a provider's shapes and dtypes (eagerly).

The table's ``rest`` column is a provider's ms/step minus these pieces: what the loop adds
(Python, the seed op, checks, allocation) or, when negative, what compilation saved.
"""

from __future__ import annotations

import torch

from ..model_caller import ModelCaller
from ..ops import guided_update, guided_update_spec
from .providers import ProviderSpec
from .timing import Timing, measure

# Step coefficients (sa, s1, sp, d, sigma, clip range) and Philox words of a typical update;
# the update's cost does not depend on their values.
_COEFS = (0.7, 0.7, 0.8, 0.6, 0.0, 1.0)
_UPDATE_OPTIONS = {"prediction_type": 0, "clip_sample": True, "draw_noise": False}


def _protector_fwd_bwd(prot_call, x, t, fused: bool):
    """The protector's forward + VJP at ``x`` as each loop computes it: ``torch.func.vjp``
    (``CPSampler``) or ``torch.autograd.grad`` on the tape (the reference). The VJP seed is a
    constant: the mode's objective is a few elementwise ops on ``[B]`` logits, nothing to time."""
    seed = torch.full((x.shape[0],), 0.5, device=x.device)
    if fused:

        def run():
            _, vjp_fn = torch.func.vjp(lambda xi: prot_call(xi, t).float(), x)
            return vjp_fn(seed)[0].contiguous()

        return run

    def run():
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            f = prot_call(xi, t).float()
            return torch.autograd.grad(f, xi, grad_outputs=seed)[0].contiguous()

    return run


def time_pieces(ctx, spec: ProviderSpec, backend: str) -> dict[str, Timing]:
    """Per-step seconds of ``eps_model``, ``protector`` (guided only) and ``update`` for
    ``spec``'s models on ``ctx`` (a :class:`SamplingContext`), at the middle timestep."""
    s = ctx.settings
    eps, prot = ctx.models(spec.bf16, spec.fp32_protector)
    B = ctx.shape[0]
    x = ctx.x_T.float().contiguous()
    t_mid = int(ctx.schedule.timesteps(s.steps)[s.steps // 2])
    t = torch.full((B,), t_mid, dtype=torch.long, device=ctx.device)
    timed = {"repeats": s.repeats, "warmup": max(1, s.warmup), "device": ctx.device}
    eps_call = ModelCaller(eps)
    out = {}
    with torch.no_grad():
        # row-major float32, as the samplers hand it to the update
        out["eps_model"], model_out = measure(lambda: eps_call(x, t).float().contiguous(), **timed)
    g = None
    if spec.guided:
        run = _protector_fwd_bwd(ModelCaller(prot), x, t, spec.fused)
        out["protector"], g = measure(run, **timed)
    coefs = torch.tensor(_COEFS, device=ctx.device)
    rng = torch.zeros(3, dtype=torch.int64, device=ctx.device)
    if spec.fused:

        def update():
            return guided_update(
                x, model_out, g, None, coefs, rng, backend=backend, **_UPDATE_OPTIONS
            )

    else:  # the reference's update is the same handful of eager elementwise ops

        def update():
            return guided_update_spec(x, model_out, g, None, coefs, rng, **_UPDATE_OPTIONS)

    with torch.no_grad():
        out["update"], _ = measure(update, **timed)
    return out
