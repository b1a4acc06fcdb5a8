"""Is a fast provider right? Its samples against the eager reference and a float64 baseline.

All providers start from the same explicit ``x_T`` with η = 0, so their samples are comparable:

- the **float64 baseline** is :func:`cpsample_fast.reference_sample` with float64 models and
  ``dtype=torch.float64`` on the first ``accuracy_batch`` samples (guided, and plain DDIM for
  the unguided providers): the accuracy columns (max / RMS error against it);
- a fused or compiled provider must reproduce the eager reference in its own model dtype within
  :func:`match_tolerance`; a provider that does not is reported as a MISMATCH (timed anyway).
"""

from __future__ import annotations

import torch

from ..reference import reference_sample
from .configs import convert_model
from .providers import ProviderSpec

# Without a float64 baseline: max |provider - reference| over max |reference| (η = 0, so the
# two differ only by rounding; bf16 models round each activation to 8 bits).
MATCH_RTOL = {False: 1e-3, True: 5e-2}


def match_tolerance(ref_err_vs_fp64: float | None, ref_scale: float, bf16: bool) -> float:
    """Largest allowed max |provider - reference in the same dtype|.

    :data:`MATCH_RTOL` of the scale; with a float64 baseline, at least 5× the reference's own
    error against it: the low-precision accuracy rule (the provider's error at most twice the
    reference's) allows 3×, and compiled float32 can reach ~3× the reference's error (inductor
    reorders the float32 reductions; benchmarks/README.md). With random weights the bf16
    trajectories are chaotic (errors of order 1), which only the baseline can tell from a wrong
    kernel.
    """
    tol = MATCH_RTOL[bf16] * ref_scale
    if ref_err_vs_fp64 is not None:
        tol = max(tol, 5.0 * ref_err_vs_fp64)
    return tol


def error(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max, RMS)`` of ``x - ref`` over ``ref``'s leading samples (the baseline's)."""
    diff = x[: ref.shape[0]].double() - ref.double()
    return float(diff.abs().max()), float(diff.pow(2).mean().sqrt())


class ReferenceCheck:
    """The reference outputs and float64 baselines of one :class:`SamplingContext`, computed
    when first needed and kept for the run."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self._outputs: dict[tuple[bool, bool], torch.Tensor] = {}  # (bf16, guided) -> samples
        self._fp64: dict[bool, tuple[torch.Tensor, float | None]] = {}  # guided -> (x, gate)
        self._failed: set[bool] = set()  # baselines that raised (not tried again)

    def count(self) -> int:
        """How many leading samples the float64 baseline (and the error columns) cover."""
        ctx = self.ctx
        return max(1, min(ctx.shape[0], int(ctx.settings.accuracy_batch)))

    def fp64(self, guided: bool = True) -> tuple[torch.Tensor, float | None]:
        """The float64 baseline's samples and, when guided, the fraction of (step, sample)
        pairs whose gate opened (None unguided)."""
        if guided not in self._fp64:
            ctx, n = self.ctx, self.count()
            eps = convert_model(ctx.eps32, torch.float64)
            prot = convert_model(ctx.prot32, torch.float64) if guided else None
            self._failed.add(guided)  # until it returns
            with torch.no_grad():
                x, trace = reference_sample(
                    eps, prot, ctx.schedule, (n, *ctx.shape[1:]), noise=ctx.x_T[:n],
                    device=ctx.device, dtype=torch.float64, return_trace=True,
                    **ctx.common_kwargs(guided),
                )  # fmt: skip
            gate = float(trace.gate.double().mean()) if guided else None
            self._fp64[guided] = (x, gate)
            self._failed.discard(guided)
        return self._fp64[guided]

    def baseline(self, guided: bool = True) -> torch.Tensor | None:
        """:meth:`fp64`'s samples, or None when ``settings.accuracy`` is off or the baseline
        failed (``run_sampler_bench`` records that failure once; it is not tried again)."""
        if not self.ctx.settings.accuracy or guided in self._failed:
            return None
        try:
            return self.fp64(guided)[0]
        except Exception:  # remembered in self._failed
            return None

    def reference_output(self, spec: ProviderSpec) -> torch.Tensor:
        """The eager reference's samples in ``spec``'s model dtype (guided or not): what a fused
        or compiled provider must reproduce."""
        key = (spec.bf16, spec.guided)
        if key not in self._outputs:
            ref_spec = ProviderSpec("reference", fused=False, bf16=spec.bf16, guided=spec.guided)
            run, _ = self.ctx.make_runner(ref_spec)
            self._outputs[key] = run().detach().clone()
        return self._outputs[key]

    def remember(self, spec: ProviderSpec, out: torch.Tensor) -> None:
        """Keep a reference provider's own timed output (saves recomputing it)."""
        if not spec.fused and not spec.fp32_protector:
            self._outputs[(spec.bf16, spec.guided)] = out.detach().clone()

    def check(self, spec: ProviderSpec, out: torch.Tensor) -> tuple[float, float]:
        """``(max |out - reference in spec's dtype|, tolerance)``.

        With the float64 baseline (``settings.accuracy``) the check covers the baseline's
        leading samples and the tolerance follows the reference's own error there
        (:func:`match_tolerance`); otherwise the whole batch against :data:`MATCH_RTOL`.
        """
        ref = self.reference_output(spec)
        base_err = None
        ref64 = self.baseline(spec.guided)
        if ref64 is not None:
            n = ref64.shape[0]
            ref, out = ref[:n], out[:n]
            base_err = error(ref, ref64)[0]
        diff = float((out.double() - ref.double()).abs().max())
        return diff, match_tolerance(base_err, float(ref.abs().max()), spec.bf16)
