"""The sampling benchmark: every provider of one configuration, timed in one process.

Providers (names used in the table, the CSV and ``--providers``):

- ``reference``: :func:`cpsample_fast.reference.reference_sample` (imported, never rewritten),
  float32 models;
- ``reference+bf16``: the same loop with the models in bf16 + channels_last (the baseline of
  the low-precision accuracy rule: a bf16 provider's error at most twice the bf16 reference's);
- ``fused``: :class:`cpsample_fast.CPSampler`, eager;
- ``fused+compile``: ``CPSampler(compile=True)`` (one ``torch.compile(fullgraph=True)`` step);
- ``fused+compile+bf16``: the same with the models in bf16 + channels_last;
- ``fused+cudagraph``: bf16 models, ``compile="reduce-overhead"`` (CUDA graphs; GPU only);
- ``ddim``: unguided DDIM (``reference_sample`` with no protector), the floor;
- ``ddim+compile+bf16``: unguided ``CPSampler``, compiled, bf16 models (the fast floor);
- ``fused+compile+bf16eps``: compiled, bf16 eps-model, float32 protector (on CPUs without AMX
  the protector's bf16 backward is slower than its float32 one).

All providers start from the same explicit ``x_T`` with η = 0, so their samples are comparable
with a float64 run of the reference (models in float64, ``dtype=torch.float64``): the accuracy
column. ms/step is split into eps-model, protector forward + backward and update by timing those
pieces alone at the same shapes and dtypes (eagerly); ``rest`` is what the loop adds (Python,
the seed op, checks, allocation) or, when negative, what compilation saved beyond the pieces.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model_caller import ModelCaller
from ..reference import objective, reference_sample
from .configs import BenchConfig, build_models, convert_model, default_schedule
from .memory import peak_memory_mib, reset_peak_memory
from .records import Row
from .timing import Timing, measure

OP_PREFIX = "sample"


@dataclass(frozen=True)
class ProviderSpec:
    """How one provider samples.

    Attributes:
        name: the provider's name.
        fused: ``CPSampler`` (True) or ``reference_sample`` (False).
        bf16: models in bf16 + channels_last (else float32).
        fp32_protector: keep the protector in float32 even when ``bf16``.
        compile: ``CPSampler``'s ``compile`` argument.
        guided: run the protector (False: unguided DDIM).
        cuda_only: only meaningful on a GPU.
    """

    name: str
    fused: bool
    bf16: bool = False
    fp32_protector: bool = False
    compile: bool | str = False
    guided: bool = True
    cuda_only: bool = False


PROVIDERS: dict[str, ProviderSpec] = {
    spec.name: spec
    for spec in (
        ProviderSpec("reference", fused=False),
        ProviderSpec("reference+bf16", fused=False, bf16=True),
        ProviderSpec("fused", fused=True),
        ProviderSpec("fused+compile", fused=True, compile=True),
        ProviderSpec("fused+compile+bf16", fused=True, bf16=True, compile=True),
        ProviderSpec(
            "fused+cudagraph", fused=True, bf16=True, compile="reduce-overhead", cuda_only=True
        ),
        ProviderSpec("ddim", fused=False, guided=False),
        ProviderSpec("ddim+compile+bf16", fused=True, bf16=True, compile=True, guided=False),
        ProviderSpec(
            "fused+compile+bf16eps", fused=True, bf16=True, compile=True, fp32_protector=True
        ),
    )
}

# Cheap ones first, the compiled ones last: a run cut short by a time limit keeps the most.
DEFAULT_PROVIDERS = (
    "reference",
    "reference+bf16",
    "ddim",
    "fused",
    "fused+compile",
    "fused+compile+bf16",
    "fused+cudagraph",
)
# --quick: no torch.compile (compiling even the tiny UNet takes tens of seconds on 2 cores).
QUICK_PROVIDERS = ("reference", "reference+bf16", "ddim", "fused")


def parse_providers(values, device: torch.device, *, quick: bool = False) -> list[str]:
    """Provider names from ``--providers`` (space or comma separated; None = the defaults).

    GPU-only providers are dropped from the defaults on a CPU and refused when asked for.
    """
    if not values:
        names = list(QUICK_PROVIDERS if quick else DEFAULT_PROVIDERS)
        return [n for n in names if device.type == "cuda" or not PROVIDERS[n].cuda_only]
    names = []
    for value in values:
        names.extend(v for v in str(value).split(",") if v)
    for name in names:
        if name not in PROVIDERS:
            raise ValueError(f"--providers: unknown provider {name!r}; known: {list(PROVIDERS)}")
        if PROVIDERS[name].cuda_only and device.type != "cuda":
            raise ValueError(f"--providers: {name!r} needs a CUDA device, got {device}")
    names = list(dict.fromkeys(names))
    # The baselines first: later rows need them for their same-run ratios.
    first = [n for n in ("reference", "reference+bf16") if n in names]
    return first + [n for n in names if n not in first]


@dataclass
class SamplerBenchSettings:
    """What to measure (the CLI's options after defaults are applied)."""

    config: BenchConfig
    device: torch.device
    batch: int
    steps: int
    providers: list[str]
    repeats: int = 3
    warmup: int = 1
    scale: float = 2.0
    alpha: float = 0.5
    backend: str = "auto"
    accuracy: bool = True
    seed: int = 0
    # The float64 baseline runs on the first samples only (each sample is independent: η = 0,
    # explicit x_T, per-sample models): on the 35M UNet a float64 run of the whole batch would
    # take longer than every provider together.
    accuracy_batch: int = 8

    def to_dict(self) -> dict:
        """JSON-able settings."""
        return {
            "config": self.config.to_dict(),
            "device": str(self.device),
            "batch": self.batch,
            "steps": self.steps,
            "providers": list(self.providers),
            "repeats": self.repeats,
            "warmup": self.warmup,
            "scale": self.scale,
            "alpha": self.alpha,
            "backend": self.backend,
            "accuracy": self.accuracy,
            "accuracy_batch": self.accuracy_batch,
            "seed": self.seed,
        }


@dataclass
class ProviderResult:
    """Everything measured for one provider."""

    name: str
    total: Timing  # seconds per sampling call
    first_call_s: float  # the first (warm-up) call, compilation included
    split: dict[str, Timing]  # per step: eps_model, protector, update (seconds)
    backend: str
    err_vs_fp64: float | None = None
    rms_err_vs_fp64: float | None = None
    err_ratio_same_dtype: float | None = None
    diff_vs_reference: float | None = None  # max |provider - reference in the same dtype|
    diff_tolerance: float | None = None
    speedup: tuple[float, float, float] | None = None  # (median, p20, p80) vs reference
    peak_mib: float | None = None  # GPU: allocator peak; CPU: process peak RSS (bench/memory.py)
    extra: dict = field(default_factory=dict)


@dataclass
class SamplerBenchResult:
    """The outcome of one run of the sampling suite."""

    settings: SamplerBenchSettings
    results: list[ProviderResult]
    errors: dict[str, str]
    gate_fraction: float | None
    rows: list[Row]


class SamplingContext:
    """Models, schedule, shapes and the shared initial noise of one run.

    ``make_runner(spec)`` gives a provider's zero-argument sampling call; the pytest-benchmark
    files time the same calls as ``cpsample bench``.
    """

    def __init__(self, settings: SamplerBenchSettings):
        self.settings = settings
        s = settings
        self.device = s.device
        self.shape = s.config.shape(s.batch)
        self.schedule = default_schedule()
        self.eps32, self.prot32 = build_models(s.config, s.device, seed=s.seed)
        self._bf16 = None
        gen = torch.Generator(device="cpu").manual_seed(s.seed + 1)
        self.x_T = torch.randn(self.shape, generator=gen).to(s.device)  # [B, C, H, W]
        self.split_cache: dict = {}
        self.reference_outputs: dict[tuple[bool, bool], torch.Tensor] = {}  # (bf16, guided)
        self._fp64: tuple[torch.Tensor, float] | None = None
        self._fp64_unguided: torch.Tensor | None = None

    def models(self, bf16: bool, fp32_protector: bool = False):
        if not bf16:
            return self.eps32, self.prot32
        if fp32_protector:
            return self.models(True)[0], self.prot32
        if self._bf16 is None:
            self._bf16 = (
                convert_model(self.eps32, torch.bfloat16, channels_last=True),
                convert_model(self.prot32, torch.bfloat16, channels_last=True),
            )
        return self._bf16

    def common_kwargs(self, guided: bool) -> dict:
        s = self.settings
        return {
            "num_inference_steps": s.steps,
            "eta": 0.0,
            "scale": s.scale if guided else 0.0,
            "alpha": s.alpha,
        }

    def make_runner(self, spec: ProviderSpec) -> tuple[Callable[[], torch.Tensor], str]:
        """A zero-argument sampling call for ``spec`` and the update backend it uses."""
        eps, prot = self.models(spec.bf16, spec.fp32_protector)
        prot = prot if spec.guided else None
        kwargs = self.common_kwargs(spec.guided)
        if not spec.fused:
            # Under no_grad, as a user calls it (diffusers pipelines do the same): the reference
            # enables grad itself for the protector; otherwise every eps-model call would also
            # record an autograd graph through the parameters.
            @torch.no_grad()
            def run_reference():
                return reference_sample(
                    eps,
                    prot,
                    self.schedule,
                    self.shape,
                    noise=self.x_T,
                    device=self.device,
                    **kwargs,
                )

            return run_reference, "eager torch"
        from .. import ops
        from ..sampler import CPSampler

        sampler = CPSampler(
            eps,
            prot,
            self.schedule,
            backend=self.settings.backend,
            compile=spec.compile,
            **kwargs,
        )
        backend = ops.resolve_backend(self.settings.backend, self.device)

        def run_fused():
            return sampler.sample(self.shape, noise=self.x_T, device=self.device)

        return run_fused, backend

    def accuracy_count(self) -> int:
        """How many leading samples the float64 baseline (and the error columns) cover."""
        return max(1, min(self.shape[0], int(self.settings.accuracy_batch)))

    def reference_output(self, spec: ProviderSpec) -> torch.Tensor:
        """The eager reference's samples in ``spec``'s model dtype (guided or not), cached:
        what a fused or compiled provider must reproduce."""
        key = (spec.bf16, spec.guided)
        if key not in self.reference_outputs:
            ref_spec = ProviderSpec("reference", fused=False, bf16=spec.bf16, guided=spec.guided)
            run, _ = self.make_runner(ref_spec)
            self.reference_outputs[key] = run().detach().clone()
        return self.reference_outputs[key]

    def remember_reference_output(self, spec: ProviderSpec, out: torch.Tensor) -> None:
        """Keep a reference provider's own timed output (saves recomputing it)."""
        if not spec.fused and not spec.fp32_protector:
            self.reference_outputs[(spec.bf16, spec.guided)] = out.detach().clone()

    def check_against_reference(self, spec: ProviderSpec, out: torch.Tensor) -> tuple[float, float]:
        """``(max |out - reference in spec's dtype|, tolerance)``.

        With the float64 baseline (guided providers, ``settings.accuracy``) the check covers the
        baseline's leading samples and the tolerance follows the reference's own error there
        (:func:`match_tolerance`); otherwise the whole batch against :data:`MATCH_RTOL`.
        """
        ref = self.reference_output(spec)
        base_err = None
        ref64 = None
        if self.settings.accuracy:
            try:
                ref64 = self.fp64_cached() if spec.guided else self.fp64_unguided()
            except Exception:  # recorded by run_sampler_bench; check without the baseline
                ref64 = None
        if ref64 is not None:
            n = ref64.shape[0]
            ref, out = ref[:n], out[:n]
            base_err = _error(ref, ref64)[0]
        diff = float((out.double() - ref.double()).abs().max())
        return diff, match_tolerance(base_err, float(ref.abs().max()), spec.bf16)

    def fp64_cached(self) -> torch.Tensor:
        """:meth:`fp64_reference`'s samples, computed once per context."""
        if self._fp64 is None:
            self._fp64 = self.fp64_reference()
        return self._fp64[0]

    def fp64_unguided(self) -> torch.Tensor:
        """Plain DDIM in float64 on the first :meth:`accuracy_count` samples: the baseline that
        tells bf16 rounding from a wrong kernel for the unguided providers too."""
        if self._fp64_unguided is None:
            eps = convert_model(self.eps32, torch.float64)
            n = self.accuracy_count()
            with torch.no_grad():
                self._fp64_unguided = reference_sample(
                    eps, None, self.schedule, (n, *self.shape[1:]), noise=self.x_T[:n],
                    device=self.device, dtype=torch.float64, **self.common_kwargs(False),
                )  # fmt: skip
        return self._fp64_unguided

    def fp64_reference(self) -> tuple[torch.Tensor, float]:
        """Samples of the reference with float64 models and state, and the gate's open fraction,
        for the first :meth:`accuracy_count` samples."""
        eps = convert_model(self.eps32, torch.float64)
        prot = convert_model(self.prot32, torch.float64)
        n = self.accuracy_count()
        with torch.no_grad():
            x, trace = reference_sample(
                eps,
                prot,
                self.schedule,
                (n, *self.shape[1:]),
                noise=self.x_T[:n],
                device=self.device,
                dtype=torch.float64,
                return_trace=True,
                **self.common_kwargs(True),
            )
        return x, float(trace.gate.double().mean())

    def split(self, spec: ProviderSpec, backend: str) -> dict[str, Timing]:
        """Per-step seconds of eps-model, protector fwd+bwd and update for ``spec``'s setting."""
        key = (spec.bf16, spec.fp32_protector, spec.guided, spec.fused, backend)
        if key in self.split_cache:
            return self.split_cache[key]
        from ..ops import guided_update, guided_update_spec

        s = self.settings
        eps, prot = self.models(spec.bf16, spec.fp32_protector)
        eps_call, prot_call = ModelCaller(eps), ModelCaller(prot)
        B = self.shape[0]
        x = self.x_T.float().contiguous()
        t_mid = int(self.schedule.timesteps(s.steps)[s.steps // 2])
        t = torch.full((B,), t_mid, dtype=torch.long, device=self.device)
        reps, warm = s.repeats, max(1, s.warmup)
        out = {}
        with torch.no_grad():
            out["eps_model"], model_out = measure(
                # row-major float32, as the samplers hand it to the update
                lambda: eps_call(x, t).float().contiguous(),
                repeats=reps,
                warmup=warm,
                device=self.device,
            )
        g = None
        if spec.guided:
            seed = torch.full((B,), 0.5, device=self.device)
            if spec.fused:

                def prot_fwd_bwd():
                    f, vjp_fn = torch.func.vjp(lambda xi: prot_call(xi, t).float(), x)
                    return vjp_fn(seed)[0].contiguous()

            else:

                def prot_fwd_bwd():
                    with torch.enable_grad():
                        xi = x.detach().requires_grad_(True)
                        f = prot_call(xi, t).float()
                        return torch.autograd.grad(objective(f, "repel").sum(), xi)[0].contiguous()

            out["protector"], g = measure(
                prot_fwd_bwd, repeats=reps, warmup=warm, device=self.device
            )
        coefs = torch.tensor([0.7, 0.7, 0.8, 0.6, 0.0, 1.0], device=self.device)
        rng = torch.tensor([0, 0, 0], dtype=torch.int64, device=self.device)
        update_kwargs = {"prediction_type": 0, "clip_sample": True, "draw_noise": False}
        if spec.fused:

            def update():
                return guided_update(
                    x, model_out, g, None, coefs, rng, backend=backend, **update_kwargs
                )

        else:
            # The reference's update is the same handful of eager elementwise ops.
            def update():
                return guided_update_spec(x, model_out, g, None, coefs, rng, **update_kwargs)

        with torch.no_grad():
            out["update"], _ = measure(update, repeats=reps, warmup=warm, device=self.device)
        self.split_cache[key] = out
        return out


def _error(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = x[: ref.shape[0]].double() - ref.double()  # ref: the leading samples only
    return float(diff.abs().max()), float(diff.pow(2).mean().sqrt())


# Without a float64 baseline: max |provider - reference| over max |reference| (η = 0, so the
# two differ only by rounding; bf16 models round each activation to 8 bits).
MATCH_RTOL = {False: 1e-3, True: 5e-2}


def match_tolerance(ref_err_vs_fp64: float | None, ref_scale: float, bf16: bool) -> float:
    """Largest allowed max |provider - reference in the same dtype|.

    :data:`MATCH_RTOL` of the scale; with a float64 baseline, at least 5× the reference's own
    error against it: the low-precision accuracy rule (the provider's error at most twice the
    reference's) allows 3×, and compiled float32 can reach ~3× the reference's error (inductor
    reorders the float32 reductions; benchmarks/README.md). With random weights the bf16
    trajectories are
    chaotic (errors of order 1), which only the baseline can tell from a wrong kernel.
    """
    tol = MATCH_RTOL[bf16] * ref_scale
    if ref_err_vs_fp64 is not None:
        tol = max(tol, 5.0 * ref_err_vs_fp64)
    return tol


def run_sampler_bench(
    settings: SamplerBenchSettings,
    progress: Callable[[str], None] | None = None,
    on_rows: Callable[[list[Row]], None] | None = None,
) -> SamplerBenchResult:
    """Measure every provider of ``settings`` in this process; failures are recorded, not raised.

    Providers are measured in the order given (the references first, see
    :func:`parse_providers`, so that every later row carries its same-run ratios).

    Args:
        settings: what to measure.
        progress: called with a short description before each stage (for a progress bar).
        on_rows: called with each provider's rows as soon as it is measured (so a run killed
            by a time limit keeps what it measured).

    Returns:
        A :class:`SamplerBenchResult` with the CSV rows of every measured quantity.
    """
    say = progress or (lambda _msg: None)
    ctx = SamplingContext(settings)
    s = settings
    errors: dict[str, str] = {}
    ref64 = gate_fraction = None
    if s.accuracy:
        say(f"reference in float64 on {ctx.accuracy_count()} samples (accuracy baseline)")
        try:
            ref64 = ctx.fp64_cached()
            gate_fraction = ctx._fp64[1]
        except Exception as exc:  # keep measuring the speed even without the accuracy baseline
            errors["reference-fp64"] = f"{type(exc).__name__}: {exc}"
    results: list[ProviderResult] = []
    rows: list[Row] = []
    for name in s.providers:
        spec = PROVIDERS[name]
        say(name)
        try:
            run, backend = ctx.make_runner(spec)
            first, _ = measure(run, repeats=1, warmup=0, device=s.device)
            warm = s.warmup + (1 if spec.compile else 0)
            reset_peak_memory(s.device)
            total, samples = measure(
                run, repeats=s.repeats, warmup=warm - 1 if warm else 0, device=s.device
            )
            peak_mib = peak_memory_mib(s.device)
            # the error first: a CUDA-graph provider's output lives in its graph's memory pool
            err = _error(samples, ref64) if ref64 is not None and spec.guided else (None, None)
            if spec.fused:
                say(f"{name}: check against the reference")
                diff, tol = ctx.check_against_reference(spec, samples)
            else:
                ctx.remember_reference_output(spec, samples)
                diff = tol = None
            del samples
            say(f"{name}: split")
            split = ctx.split(spec, backend)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            errors[name + ":traceback"] = traceback.format_exc(limit=8)
            continue
        result = ProviderResult(name, total, first.median, split, backend, peak_mib=peak_mib)
        result.err_vs_fp64, result.rms_err_vs_fp64 = err
        result.diff_vs_reference, result.diff_tolerance = diff, tol
        if diff is not None and not diff <= tol:  # also catches NaN
            errors[name] = (
                f"MISMATCH: max |{name} - {_base_name(spec)}| = {diff:.3g} exceeds {tol:.3g} "
                "(timed anyway; its numbers are not trustworthy)"
            )
        results.append(result)
        _ratios(results)
        new_rows = _rows(settings, [result], gate_fraction)
        rows += new_rows
        if on_rows is not None:
            on_rows(new_rows)
    return SamplerBenchResult(settings, results, errors, gate_fraction, rows)


def _base_name(spec: ProviderSpec) -> str:
    """The reference provider a provider is compared with (same model dtype)."""
    return "reference+bf16" if spec.bf16 else "reference"


def _ratios(results: list[ProviderResult]) -> None:
    by_name = {r.name: r for r in results}
    ref = by_name.get("reference")
    for r in results:
        if ref is not None:
            # median ratio, and a conservative band: fast reference repeat vs slow provider one
            r.speedup = (
                ref.total.median / r.total.median,
                ref.total.p20 / r.total.p80,
                ref.total.p80 / r.total.p20,
            )
        spec = PROVIDERS[r.name]
        base = by_name.get("reference+bf16" if spec.bf16 else "reference")
        if (
            spec.guided
            and base is not None
            and r.err_vs_fp64 is not None
            and base.err_vs_fp64 is not None
            and base.err_vs_fp64 > 0
        ):
            r.err_ratio_same_dtype = r.err_vs_fp64 / base.err_vs_fp64


def _rows(
    settings: SamplerBenchSettings, results: list[ProviderResult], gate_fraction
) -> list[Row]:
    s = settings
    B, steps = s.batch, s.steps
    op = f"{OP_PREFIX}/{s.config.name}"
    rows: list[Row] = []
    for r in results:
        spec = PROVIDERS[r.name]
        extra = {
            "config": s.config.name,
            "shape": list(s.config.shape(B)),
            "steps": steps,
            "scale": s.scale if spec.guided else 0.0,
            "alpha": s.alpha,
            "model_dtype": "bfloat16" if spec.bf16 else "float32",
            "protector_dtype": "bfloat16" if spec.bf16 and not spec.fp32_protector else "float32",
            "channels_last": spec.bf16,
            "compile": spec.compile,
            "update_backend": r.backend,
            "repeats": s.repeats,
            "gate_fraction": gate_fraction,
        }

        def row(metric, unit, median, p20, p80, r=r, extra=extra):
            rows.append(
                Row(op, r.name, "sample", metric, unit, "batch", B, median, p20, p80, extra)
            )

        t = r.total
        row("images_per_s", "img/s", B / t.median, B / t.p80, B / t.p20)
        per_step = t.scaled(1000.0 / steps)
        row("ms_per_step", "ms", per_step.median, per_step.p20, per_step.p80)
        for piece, timing in r.split.items():
            ms = timing.scaled(1000.0)
            row(f"{piece}_ms", "ms", ms.median, ms.p20, ms.p80)
        row("first_call_s", "s", r.first_call_s, r.first_call_s, r.first_call_s)
        if r.peak_mib is not None:
            row("peak_memory", "MiB", r.peak_mib, r.peak_mib, r.peak_mib)
        if r.speedup is not None:
            row("speedup_vs_reference", "x", *r.speedup)
        if r.err_vs_fp64 is not None:
            row("max_abs_err_vs_fp64", "abs", r.err_vs_fp64, r.err_vs_fp64, r.err_vs_fp64)
            row("rms_err_vs_fp64", "abs", r.rms_err_vs_fp64, r.rms_err_vs_fp64, r.rms_err_vs_fp64)
        if r.err_ratio_same_dtype is not None:
            v = r.err_ratio_same_dtype
            row("err_ratio_vs_reference_same_dtype", "x", v, v, v)
        if r.diff_vs_reference is not None:
            v = r.diff_vs_reference
            extra_tol = {**extra, "tolerance": r.diff_tolerance, "ok": v <= r.diff_tolerance}
            row("max_abs_diff_vs_reference", "abs", v, v, v, extra=extra_tol)
    return rows


def format_table(result: SamplerBenchResult) -> str:
    """The sampling suite as one plain-text table (what ``cpsample bench`` prints)."""
    s = result.settings
    lines = [
        f"cpsample bench: {s.config.about}; batch {s.batch}, {s.steps} DDIM steps, "
        f"scale {s.scale}, alpha {s.alpha}, device {s.device}, {torch.get_num_threads()} threads",
    ]
    if result.gate_fraction is not None:
        lines.append(f"gate open in {100 * result.gate_fraction:.0f}% of (step, sample) pairs")
    head = (
        f"{'provider':<20} {'img/s':>8} {'ms/step':>9} {'[p20-p80]':>15} {'eps':>8} "
        f"{'prot f+b':>8} {'update':>7} {'rest':>8} {'x ref':>6} {'err vs fp64':>11} "
        f"{'err/ref':>7} {'peak MiB':>8}  backend"
    )
    lines += [head, "-" * len(head)]
    for r in result.results:
        per = r.total.scaled(1000.0 / s.steps)
        pieces = {k: v.median * 1000.0 for k, v in r.split.items()}
        rest = per.median - sum(pieces.values())
        band = f"[{per.p20:.1f}-{per.p80:.1f}]"
        speed = f"{r.speedup[0]:.2f}" if r.speedup else "-"
        err = f"{r.err_vs_fp64:.2e}" if r.err_vs_fp64 is not None else "-"
        ratio = f"{r.err_ratio_same_dtype:.2f}" if r.err_ratio_same_dtype is not None else "-"
        prot = f"{pieces['protector']:.2f}" if "protector" in pieces else "-"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        lines.append(
            f"{r.name:<20} {s.batch / r.total.median:>8.2f} {per.median:>9.2f} {band:>15} "
            f"{pieces['eps_model']:>8.2f} {prot:>8} {pieces['update']:>7.3f} {rest:>8.2f} "
            f"{speed:>6} {err:>11} {ratio:>7} {peak:>8}  {r.backend}"
        )
    for name, msg in result.errors.items():
        if not name.endswith(":traceback"):
            lines.append(f"{name:<20} FAILED: {short_error(msg)}")
    lines.append(
        "ms columns are per step (median); eps / prot f+b / update timed alone at the same shapes; "
        "x ref = reference median / provider median; err/ref = error vs fp64 over the reference's "
        "in the same model dtype (rule: <= 2); peak MiB = CUDA allocator peak, or the process's "
        "peak RSS on the CPU, over the timed calls."
    )
    return "\n".join(lines)


def short_error(msg: str, width: int = 200) -> str:
    """The first two non-empty lines of an error message, on one line (for tables)."""
    parts = [line.strip() for line in msg.splitlines() if line.strip()][:2]
    return " ".join(parts)[:width]


def summary(result: SamplerBenchResult) -> dict:
    """JSON-able summary of the run (settings, per-provider numbers, errors)."""
    out = []
    for r in result.results:
        out.append(
            {
                "provider": r.name,
                "seconds_per_call": {
                    "median": r.total.median,
                    "p20": r.total.p20,
                    "p80": r.total.p80,
                },
                "samples_s": list(r.total.samples),
                "images_per_s": result.settings.batch / r.total.median,
                "first_call_s": r.first_call_s,
                "peak_memory_mib": r.peak_mib,
                "split_ms": {k: v.median * 1000.0 for k, v in r.split.items()},
                "speedup_vs_reference": None if r.speedup is None else r.speedup[0],
                "max_abs_err_vs_fp64": r.err_vs_fp64,
                "rms_err_vs_fp64": r.rms_err_vs_fp64,
                "err_ratio_vs_reference_same_dtype": r.err_ratio_same_dtype,
                "max_abs_diff_vs_reference": r.diff_vs_reference,
                "diff_tolerance": r.diff_tolerance,
                "update_backend": r.backend,
            }
        )
    return {
        "settings": result.settings.to_dict(),
        "gate_fraction": result.gate_fraction,
        "providers": out,
        "errors": result.errors,
        "finite": all(math.isfinite(p["images_per_s"]) for p in out),
    }
