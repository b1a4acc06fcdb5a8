"""``ProtectedScheduler``: CPSample guidance around any supported diffusers scheduler.

``pipe.scheduler = ProtectedScheduler(pipe.scheduler, protector, scale=..., alpha=...)``
protects a pipeline with one line. The wrapper changes only what ``step`` receives: the model
output is converted to the pair (x̂0, ε) in the DDPM parametrisation of the noisy sample the
model saw (docs/ALGORITHM.md §1), guided (§3 steps 2–5: ``ε̂ = ε + G``,
``x̂0_g = x̂0 − (s1/sa)·G``), converted back to the scheduler's ``prediction_type`` and handed to
the inner ``step`` with the caller's own arguments (``eta``, ``generator``, …). Everything else
(``config``, ``set_timesteps``, ``timesteps``, ``init_noise_sigma``, ``scale_model_input``,
``order``) is the inner scheduler's.

Where the noisy sample lives:

- ``DDIMScheduler``, ``DDPMScheduler``: ``sample`` is ``x_t = sa·x0 + s1·ε`` with
  ``ᾱ_t = alphas_cumprod[t]``.
- ``DPMSolverMultistepScheduler``, ``DPMSolverSinglestepScheduler``, ``UniPCMultistepScheduler``,
  ``DEISMultistepScheduler``: ``sample`` is ``x_t`` with ``sa = 1/√(1+σ²)``, ``s1 = σ·sa``,
  ``σ = sigmas[step_index]`` (their ``_sigma_to_alpha_sigma_t``).
- σ-space schedulers (``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``,
  ``HeunDiscreteScheduler``, ``LMSDiscreteScheduler``): ``sample`` is ``x_σ = x0 + σ·ε`` and the
  model sees ``scale_model_input(x_σ) = x_σ/√(1+σ²) = x_t`` with the same ``sa``, ``s1``; the
  protector gets that ``x_t`` and the gradient is taken with respect to it.

The protector is called with the timestep the scheduler hands the model, rounded to an integer
training timestep.

Clipping (docs/ALGORITHM.md §3 step 6): the guidance acts after the clip. ``DDIMScheduler`` and
``DDPMScheduler`` with ``clip_sample`` take the step on the model's own output (their clip, their
noise, ``use_clipped_model_output`` as given) and the wrapper adds the guidance's effect: x̂0 moves
by ``-(s1/sa)·G`` and the step's output by ``k`` times that, ``k`` its derivative in x̂0 at fixed
x_t (DDIM ``sp − d·sa/s1``, DDPM the posterior mean's ``c0``) — exactly the fast sampler's step.
Other clipping steps (Heun) pair x̂0 with the real x_t and are handed the guided x̂0, which their
clip then caps (consistent, but weaker).
Samples the gate leaves shut get the inner step's own arguments, bit for bit.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

from ..constants import PREDICTION_TYPES
from ..guidance import check_alpha, mode_id, vjp_seed
from ..model_caller import ModelCaller
from ..protector.fit import check_protector_fits
from ..trace import SamplingTrace

# scheduler class name -> where its sample lives (see the module docstring)
_KINDS = {
    "DDIMScheduler": "alphas",
    "DDPMScheduler": "alphas",
    "DPMSolverMultistepScheduler": "vp_sigma",
    "DPMSolverSinglestepScheduler": "vp_sigma",
    "UniPCMultistepScheduler": "vp_sigma",
    "DEISMultistepScheduler": "vp_sigma",
    "EulerDiscreteScheduler": "ve_sigma",
    "EulerAncestralDiscreteScheduler": "ve_sigma",
    "HeunDiscreteScheduler": "ve_sigma",
    "LMSDiscreteScheduler": "ve_sigma",
}
SUPPORTED_SCHEDULERS = tuple(_KINDS)
# config values that change the maths in ways the conversion above does not cover
_REFUSED = {
    "thresholding": (True,),
    "timestep_type": ("continuous",),
    "use_flow_sigmas": (True,),
    "rescale_betas_zero_snr": (True,),
}
_OWN = frozenset(
    {"_inner", "_protector", "_caller", "scale", "alpha", "mode", "guidance_range",
     "_kind", "_records", "step", "set_timesteps", "_step_params"}
)  # fmt: skip


def check_scheduler(scheduler) -> str:
    """The sample-space kind of a supported scheduler, or a ValueError naming the supported."""
    name = type(scheduler).__name__
    if name not in _KINDS:
        raise ValueError(
            f"scheduler: {name} cannot be driven by ProtectedScheduler; supported: "
            f"{', '.join(SUPPORTED_SCHEDULERS)}"
        )
    config = scheduler.config
    for key, bad in _REFUSED.items():
        if config.get(key, None) in bad:
            raise ValueError(
                f"scheduler: {name} with {key}={config[key]!r} is not supported by CPSample "
                "guidance (it changes the parametrisation the protector is trained in)"
            )
    pred = config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler: prediction_type={pred!r} is not supported; expected one of "
            f"{PREDICTION_TYPES}"
        )
    return _KINDS[name]


def _is_frozen(module) -> bool:
    if not isinstance(module, torch.nn.Module):
        return True
    return not module.training and not any(p.requires_grad for p in module.parameters())


class ProtectedScheduler:
    """Wrap a diffusers scheduler so that every ``step`` applies CPSample guidance.

    Args:
        scheduler: a diffusers scheduler of a supported type (``SUPPORTED_SCHEDULERS``).
        protector: ``protector(x_t, t) -> logits [B]`` trained in the DDPM parametrisation of
            the samples the model sees (pixels, or latents × the VAE's scaling factor).
        scale: guidance scale s ≥ 0 (0 = the inner scheduler, unchanged).
        alpha: gate threshold α ∈ (0, 0.5].
        mode: ``"repel"``, ``"attract"`` or ``"entropy"`` (docs/ALGORITHM.md §3 step 4).
        guidance_range: optional inclusive ``(t_min, t_max)`` of training timesteps where the
            protector is run; elsewhere the step is the inner one.

    Attributes:
        trace: :class:`~cpsample_fast.trace.SamplingTrace` of the steps since the last
            ``set_timesteps`` (logits, confidence and gate per step and sample).
    """

    def __init__(self, scheduler, protector, *, scale, alpha, mode="repel", guidance_range=None):
        if isinstance(scheduler, ProtectedScheduler):
            raise TypeError("scheduler is already a ProtectedScheduler")
        kind = check_scheduler(scheduler)
        scale = float(scale)
        if not scale >= 0 or scale != scale or scale == float("inf"):
            raise ValueError(f"scale must be a finite number >= 0, got {scale}")
        if protector is None and scale > 0:
            raise ValueError("protector is required when scale > 0")
        if guidance_range is not None:
            lo, hi = (int(v) for v in guidance_range)
            if lo > hi:
                raise ValueError(f"guidance_range must be (t_min, t_max) with t_min <= t_max, "
                                 f"got {guidance_range}")  # fmt: skip
            guidance_range = (lo, hi)
        if protector is not None and not _is_frozen(protector):
            warnings.warn(
                "protector is not frozen (training mode or parameters with requires_grad): "
                "call protector.eval().requires_grad_(False) before sampling",
                stacklevel=2,
            )
        set_ = object.__setattr__
        set_(self, "_inner", scheduler)
        set_(self, "_kind", kind)
        set_(self, "_protector", protector)
        set_(self, "_caller", ModelCaller(protector) if protector is not None else None)
        set_(self, "scale", scale)
        set_(self, "alpha", check_alpha(alpha))
        mode_id(mode)
        set_(self, "mode", mode)
        set_(self, "guidance_range", guidance_range)
        set_(self, "_records", [])
        set_(self, "_step_params", inspect.signature(scheduler.step))

        # Per-instance wrappers that show the inner methods' signatures to pipelines (they
        # inspect step for eta/generator and set_timesteps for timesteps/sigmas).
        @functools.wraps(scheduler.step)
        def step(model_output, timestep, sample, *args, **kwargs):
            return self._protected_step(model_output, timestep, sample, args, kwargs)

        @functools.wraps(scheduler.set_timesteps)
        def set_timesteps(*args, **kwargs):
            self._records.clear()
            return self._inner.set_timesteps(*args, **kwargs)

        set_(self, "step", step)
        set_(self, "set_timesteps", set_timesteps)

    # ------------------------------------------------------------------ delegation
    def __getattr__(self, name):
        if name.startswith("__") or name in _OWN:
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __setattr__(self, name, value):
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)

    def __repr__(self) -> str:
        return (
            f"ProtectedScheduler({type(self._inner).__name__}, scale={self.scale}, "
            f"alpha={self.alpha}, mode={self.mode!r}, guidance_range={self.guidance_range})"
        )

    @property
    def inner(self):
        """The wrapped scheduler."""
        return self._inner

    @property
    def protector(self):
        return self._protector

    # ------------------------------------------------------------------ trace
    @property
    def trace(self) -> SamplingTrace | None:
        """Per-step record since the last ``set_timesteps`` (None before the first step)."""
        if not self._records:
            return None
        ts, logits, conf, gates = zip(*self._records)
        return SamplingTrace(
            timesteps=torch.tensor(ts, dtype=torch.int64),
            logits=torch.stack(logits),
            confidence=torch.stack(conf),
            gate=torch.stack(gates),
        )

    # ------------------------------------------------------------------ the step
    def _coefficients(self, timestep, sample):
        """``(x_t, sa, s1)``: the model's noisy input in the DDPM parametrisation."""
        inner = self._inner
        if self._kind == "alphas":
            t = int(timestep)
            abar = inner.alphas_cumprod[t].to(torch.float32)
            sa = float(abar**0.5)
            s1 = float((1 - abar) ** 0.5)
            return sample, sa, s1
        if getattr(inner, "step_index", None) is None:
            inner._init_step_index(timestep)  # as inner.step would (idempotent)
        sigma = float(inner.sigmas[inner.step_index])
        sa = 1.0 / (sigma * sigma + 1.0) ** 0.5
        s1 = sigma * sa
        if self._kind == "vp_sigma":
            return sample, sa, s1
        return sample * sa, sa, s1  # σ-space: x_t = x_σ/√(1+σ²)

    def _guided(self, timestep) -> bool:
        if self._protector is None or self.scale == 0:
            return False
        if self.guidance_range is None:
            return True
        t = float(timestep)
        return self.guidance_range[0] <= t <= self.guidance_range[1]

    def _guidance(self, x_t, t_int, s1):
        """``(G, f, q, m)``: docs/ALGORITHM.md §3 steps 2–5 (one VJP of the logits)."""
        B = x_t.shape[0]
        t = torch.full((B,), t_int, dtype=torch.int64, device=x_t.device)
        with torch.enable_grad():
            x_in = x_t.detach().float().requires_grad_(True)
            f = self._caller(x_in, t)
            if not isinstance(f, torch.Tensor) or f.shape not in ((B,), (B, 1)):
                raise ValueError(
                    f"protector must return logits of shape [{B}] for latents "
                    f"{list(x_t.shape)}, got {getattr(f, 'shape', type(f).__name__)}"
                )
            f = f.reshape(B).float()
            c, q, m = vjp_seed(f.detach(), 1.0, self.alpha, self.mode)
            (g,) = torch.autograd.grad(f, x_in, grad_outputs=c)
        G = g.float() * (self.scale * s1)
        return G, f.detach(), q, m

    def _protected_step(self, model_output, timestep, sample, args, kwargs):
        inner = self._inner
        t_int = int(round(float(timestep)))
        if not self._guided(timestep):
            B = sample.shape[0]
            nan = torch.full((B,), float("nan"), device=sample.device)
            self._records.append(
                (t_int, nan, nan, torch.zeros(B, dtype=torch.bool, device=nan.device))
            )
            return inner.step(model_output, timestep, sample, *args, **kwargs)
        check_protector_fits(self._protector, tuple(sample.shape[1:]))
        x_t, sa, s1 = self._coefficients(timestep, sample)
        C = sample.shape[1]
        extra = None
        if model_output.shape[1] == 2 * C and model_output.shape[1] != C:
            # learned variance (DDPM variance_type learned/learned_range): guide the mean part
            model_output, extra = model_output[:, :C], model_output[:, C:]
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output must have the sample's shape {list(sample.shape)} "
                f"(or 2C channels for learned variance), got {list(model_output.shape)}"
            )
        G, f, q, m = self._guidance(x_t, t_int, s1)
        self._records.append((t_int, f, q, m))

        pred = inner.config.get("prediction_type", "epsilon")
        o = model_output.float()
        xt = x_t.float()
        # the (x̂0, ε) pair of docs/ALGORITHM.md §1
        if pred == "epsilon":
            eps, x0 = o, (xt - s1 * o) / sa
        elif pred == "sample":
            x0, eps = o, (xt - sa * o) / s1
        else:
            x0, eps = sa * xt - s1 * o, sa * o + s1 * xt
        if inner.config.get("clip_sample", False):
            kind = type(inner).__name__
            if kind in ("DDIMScheduler", "DDPMScheduler"):
                return self._step_after_clip(
                    kind, model_output, extra, timestep, sample, G, m, sa, s1, args, kwargs
                )
            # other clipping steps pair x̂0 with the real x_t (Heun): the guided x̂0 is clipped
            # with the model's part, consistently but with the leverage capped by the clip
        out = _to_prediction(pred, x0 - (s1 / sa) * G, eps + G, xt, sa, s1)
        # samples the gate left shut keep the inner step's own inputs, bit for bit
        keep = ~m.reshape(-1, *([1] * (sample.dim() - 1)))
        out = torch.where(keep, model_output, out.to(model_output.dtype))
        if extra is not None:
            out = torch.cat([out, extra], dim=1)
        return inner.step(out, timestep, sample, *args, **kwargs)

    def _step_after_clip(self, kind, model_output, extra, timestep, sample, G, m, sa, s1, args,
                         kwargs):  # fmt: skip
        """DDIM/DDPM with ``clip_sample``: the inner step runs on the model's own output (its
        clip, its noise), then the guidance's effect is added (docs/ALGORITHM.md §3 step 6):
        x̂0 moves by ``shift = -(s1/sa)·G`` after the clip, and the step's output by
        ``k·shift`` with ``k`` its derivative in x̂0 at fixed x_t (DDIM: ``sp - d·sa/s1``, also
        with ``use_clipped_model_output``; DDPM: the posterior mean's ``c0``)."""
        inner = self._inner
        full = model_output if extra is None else torch.cat([model_output, extra], dim=1)
        res = inner.step(full, timestep, sample, *args, **kwargs)
        bound = self._step_params.bind(model_output, timestep, sample, *args, **kwargs)
        t = int(timestep)
        ac = inner.alphas_cumprod
        if kind == "DDIMScheduler":
            prev_t = t - inner.config.num_train_timesteps // inner.num_inference_steps
            a_prev = ac[prev_t] if prev_t >= 0 else inner.final_alpha_cumprod
            eta = float(bound.arguments.get("eta", 0.0))
            var = inner._get_variance(t, prev_t)
            d = (1 - a_prev - eta**2 * var) ** 0.5
            k = float(a_prev**0.5 - d * sa / s1)
        else:
            prev_t = int(inner.previous_timestep(t))
            a_prev = ac[prev_t] if prev_t >= 0 else inner.one
            beta_t = 1 - ac[t] / a_prev
            k = float(a_prev**0.5 * beta_t / (1 - ac[t]))
        shift = -(s1 / sa) * G
        keep = ~m.reshape(-1, *([1] * (sample.dim() - 1)))

        def moved(v, coef):
            return torch.where(keep, v, (v.float() + coef * shift).to(v.dtype))

        if isinstance(res, tuple):
            return (moved(res[0], k), moved(res[1], 1.0), *res[2:])
        res.prev_sample = moved(res.prev_sample, k)
        res.pred_original_sample = moved(res.pred_original_sample, 1.0)
        return res


def _to_prediction(pred, x0, eps, xt, sa, s1):
    """The model output of type ``pred`` that means the pair (x0, eps) at ``xt``."""
    if pred == "epsilon":
        return eps
    if pred == "sample":
        return x0
    return sa * eps - s1 * x0
