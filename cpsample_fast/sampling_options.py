"""The options every sampling loop shares, checked in one place (docs/ALGORITHM.md §3, §5).

``reference_sample`` and ``CPSampler`` take the same guidance and solver options; both resolve
them here, so that the reference and the fast loop accept and refuse exactly the same input.
Also the per-call integer arguments of the fast loop (seed and sample offset as the int64 words
the device tables hold).
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import SAMPLE_INDEX_LIMIT
from .solvers import FINAL_SIGMAS_TYPES, check_solver
from .validation import check_int, check_sampling_args, resolve_guidance_args


@dataclass(frozen=True)
class SamplingOptions:
    """The resolved, checked options of one sampler (``scale``/``alpha`` as floats, ``solver``
    canonical, ``guidance_range`` an ``(int, int)`` tuple or None)."""

    scale: float
    alpha: float
    eta: float
    mode: str
    solver: str
    use_clipped_model_output: bool
    guidance_range: tuple[int, int] | None
    final_sigmas_type: str = "zero"

    def guides_at(self, t: int, has_protector: bool) -> bool:
        """Whether the protector runs at training timestep ``t`` (docs/ALGORITHM.md §3 step 5:
        G = 0 without a protector, with ``scale = 0`` and outside ``guidance_range``)."""
        if not has_protector or self.scale <= 0:
            return False
        return self.guidance_range is None or self.guidance_range[0] <= t <= self.guidance_range[1]


def check_guidance_range(guidance_range) -> tuple[int, int] | None:
    """``guidance_range`` is None or an inclusive ``(t_min, t_max)`` with ``t_min <= t_max``."""
    if guidance_range is None:
        return None
    lo, hi = (int(v) for v in guidance_range)
    if lo > hi:
        raise ValueError(
            f"guidance_range must be (t_min, t_max), t_min <= t_max; got {guidance_range}"
        )
    return lo, hi


def resolve_sampling_options(
    protector,
    schedule,
    *,
    num_inference_steps: int,
    eta: float,
    scale: float | None,
    alpha: float | None,
    mode: str,
    solver: str,
    use_clipped_model_output: bool,
    guidance_range,
    final_sigmas_type: str = "zero",
) -> SamplingOptions:
    """Check the options of ``reference_sample`` / ``CPSampler`` once; ``TypeError`` or
    ``ValueError`` naming the bad one."""
    scale, alpha = resolve_guidance_args(protector, scale, alpha)
    check_sampling_args(
        schedule,
        num_inference_steps=num_inference_steps,
        eta=eta,
        scale=scale,
        alpha=alpha,
        mode=mode,
    )
    if not isinstance(use_clipped_model_output, bool):
        raise TypeError(
            f"use_clipped_model_output must be a bool, got {use_clipped_model_output!r}"
        )
    solver = check_solver(solver, eta=eta, num_inference_steps=num_inference_steps)
    if solver != "ddim" and use_clipped_model_output:
        raise ValueError(
            f"use_clipped_model_output is a DDIM option; solver={solver!r} uses x̂0 only"
        )
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(
            f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES} (diffusers' "
            f"DPMSolverMultistepScheduler option), got {final_sigmas_type!r}"
        )
    if solver == "ddim" and final_sigmas_type != "zero":
        raise ValueError(
            f"final_sigmas_type={final_sigmas_type!r} is a DPM-Solver++ option; DDIM ends at "
            "the schedule's final_alpha_cumprod (set_alpha_to_one)"
        )
    return SamplingOptions(
        final_sigmas_type=final_sigmas_type,
        scale=float(scale),
        alpha=float(alpha),
        eta=float(eta),
        mode=mode,
        solver=solver,
        use_clipped_model_output=use_clipped_model_output,
        guidance_range=check_guidance_range(guidance_range),
    )


def as_int64(value: int) -> int:
    """A checked Python int in ``[0, 2**64)`` as the signed int64 the device tables hold (values
    in ``[2**63, 2**64)`` wrap to the same 64 bits, which is what the Philox key reads)."""
    return value - 2**64 if value >= 2**63 else value


def check_offset(sample_offset) -> int:
    """``sample_offset`` is a sample index: an int in ``[0, 2**32)`` (Philox counter word c1)."""
    value = check_int("sample_offset", sample_offset, lo=0)
    if value >= SAMPLE_INDEX_LIMIT:
        raise ValueError(f"sample_offset must be in [0, 2**32), got {value}")
    return value
