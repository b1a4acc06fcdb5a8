"""CPSampler: the fast protected DDIM loop (docs/ALGORITHM.md §3), free of host synchronisation.

One step is: eps-model forward, protector forward + one VJP (``torch.func.vjp``, input gradient
only), the ``cpsample::guidance_seed`` op turning logits into the per-sample VJP seed, and one
fused ``cpsample::guided_update``. Schedule coefficients live in device tables indexed by a step
tensor, the gate never reaches the host, and NaN/inf is recorded on the device (first bad step
per source) and checked once after the loop. With ``compile=True`` the whole step is one
``torch.compile(fullgraph=True)`` graph reused for every step of every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import noise as _noise
from . import ops
from .constants import PREDICTION_TYPE_IDS
from .guidance import mode_id
from .model_caller import ModelCaller
from .sampling_options import as_int64, check_offset, resolve_sampling_options
from .schedule_tables import ddim_coef_table
from .solvers import dpm_coef_table, dpm_timesteps
from .step_guidance import guidance_term
from .trace import SamplingTrace
from .validation import (
    check_model_output,
    check_noise_args,
    check_seed,
    check_shape,
)

# Sources whose first non-finite step is recorded on the device, in this order.
_BAD_SOURCES = ("eps_model", "protector", "the update")


@dataclass(frozen=True)
class _Run:
    """What one ``sample()`` call resolved: static for the compiled step."""

    backend: str
    seed_backend: str
    side_stream: object = None


class CPSampler:
    """Drop-in fast CPSample sampler (docs/ALGORITHM.md §5), same results as ``reference_sample``.

    Args:
        eps_model: ``eps_model(x [B,C,H,W], t int64 [B]) -> [B,C,H,W]``; any dtype / memory
            format (it is fed its own; x_t and the update stay float32).
        protector: ``protector(x, t) -> logits [B]`` or None (plain DDIM).
        schedule: a ``NoiseSchedule``.
        num_inference_steps: number of DDIM steps.
        eta: DDIM η ≥ 0.
        scale: guidance scale s ≥ 0 (0 = plain DDIM); required with a protector (paper: 1000).
        alpha: gate threshold α ∈ (0, 0.5]; required with a protector (paper: 0.001).
        mode: ``"repel"``, ``"attract"`` or ``"entropy"``.
        backend: fused-update backend, ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpp"`` or
            ``"torch"``.
        compile: False, True (``torch.compile(fullgraph=True)`` of the whole step) or a
            ``torch.compile`` mode string such as ``"reduce-overhead"`` (CUDA graphs on GPU).
        guidance_range: optional inclusive ``(t_min, t_max)`` of training timesteps where the
            protector is run; elsewhere the step skips it entirely (a static, per-step choice:
            use it where the protector's report shows it never reaches the gate, e.g. from
            ``report.acting_range()``); the steps outside save the protector's forward and
            backward.
        streams: on CUDA, run the protector's forward + VJP on a side stream, overlapping the
            eps-model (eager mode only: ``torch.compile`` does not trace streams).
        compile_options: inductor options for ``compile``, e.g. ``{"freezing": True}``
            (constant-folds the weights; the models' weights must not change afterwards).
        use_clipped_model_output: as diffusers' ``DDIMScheduler.step``: the direction term's ε̂
            is re-derived from the clipped x̂0, ``(x_t - √ᾱ_t·x̂0) / √(1-ᾱ_t)``, for every sample
            (default False: the model's ε, plus the guidance's clipped shift of x̂0 on guided
            samples; docs/CONTRACTS.md "The fused update").
        solver: ``"ddim"`` (default) or ``"dpmsolver++"``: diffusers' DPMSolverMultistepScheduler
            defaults (second-order multistep, η = 0, ``num_inference_steps >= 2``), one fused
            ``cpsample::dpm_update`` per step carrying the previous x̂0 as a tensor
            (``cpsample_fast.solvers``; docs/CONTRACTS.md "The multistep update").
        final_sigmas_type: DPM-Solver++ only, as diffusers' option: ``"zero"`` (default) or
            ``"sigma_min"`` (the last step lands on σ at t = 0 instead of 0).
    """

    def __init__(
        self,
        eps_model,
        protector,
        schedule,
        *,
        num_inference_steps: int,
        eta: float = 0.0,
        scale: float | None = None,
        alpha: float | None = None,
        mode: str = "repel",
        backend: str = "auto",
        compile: bool | str = False,
        guidance_range: tuple[int, int] | None = None,
        streams: bool = False,
        compile_options: dict | None = None,
        use_clipped_model_output: bool = False,
        solver: str = "ddim",
        final_sigmas_type: str = "zero",
    ):
        opts = resolve_sampling_options(
            protector, schedule, num_inference_steps=num_inference_steps, eta=eta, scale=scale,
            alpha=alpha, mode=mode, solver=solver,
            use_clipped_model_output=use_clipped_model_output, guidance_range=guidance_range,
            final_sigmas_type=final_sigmas_type,
        )  # fmt: skip
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        if streams and compile:
            raise ValueError("streams=True works in eager mode only; use compile=False with it")
        self.eps_model = eps_model
        self.protector = protector
        self.schedule = schedule
        self.num_inference_steps = num_inference_steps
        self.solver = opts.solver
        self.final_sigmas_type = opts.final_sigmas_type
        self.eta = opts.eta
        self.use_clipped_model_output = opts.use_clipped_model_output
        self.scale = opts.scale
        self.alpha = opts.alpha
        self.mode = mode
        self.backend = backend
        self.compile = compile
        self.guidance_range = opts.guidance_range
        self.streams = bool(streams)
        self._eps = ModelCaller(eps_model)
        self._prot = ModelCaller(protector) if protector is not None else None
        self._prediction = PREDICTION_TYPE_IDS[schedule.prediction_type]
        self._mode_id = mode_id(mode)

        n = num_inference_steps
        if self.solver == "ddim":
            self.timesteps = schedule.timesteps(n)  # [n] int64, host
            self._coef_table = ddim_coef_table(schedule, n, self.eta)  # [n, 6]
        else:  # multistep: its own timesteps; [n, 7] rows of the dpm_update op's `coefs`
            self.timesteps = dpm_timesteps(schedule, n)
            self._coef_table = dpm_coef_table(schedule, n, self.final_sigmas_type)
        # [n]: s·√(1-ᾱ_t) (DDIM) or s·σ_t in the solver's own σ_t, the seed op's scale; column 1
        # of both tables is that noise level
        self._scale_table = (self.scale * self._coef_table[:, 1]).to(torch.float32)
        # Static per-step choice (known on the host before the loop): run the protector?
        self._guided_steps = [opts.guides_at(int(t), protector is not None) for t in self.timesteps]
        self._tables: dict = {}
        self._compiled = {}
        # torch.compile backend; tests swap in a graph counter to check "one graph, all steps"
        self.compile_backend = "inductor"
        self.compile_options = dict(compile_options or {})

    @classmethod
    def from_settings(cls, settings, eps_model, protector, schedule, *, protector_meta=None, **kw):
        """A sampler with the options of a settings JSON (``cps.tune_guidance``'s output).

        ``settings`` is a path or a dict. The file records the eps-model's and the protector's
        state-dict hashes (``cpsample_fast.settings``); other weights are refused with a
        ``ValueError`` naming the mismatch. ``kw`` (``backend``, ``compile``, ...) go to the
        constructor; sampler options given there override the file's.
        """
        from .settings import load_settings, sampler_kwargs

        loaded = load_settings(
            settings, eps_model=eps_model, protector=protector, protector_meta=protector_meta
        )
        return cls(eps_model, protector, schedule, **{**sampler_kwargs(loaded), **kw})

    # ------------------------------------------------------------------ the step
    def _step(self, x, k, tables, rng_base, z, guided: bool, draw_noise: bool, run: _Run):
        """One protected step (docs/ALGORITHM.md §3 steps 1–7) with no host synchronisation.

        ``x`` ``[B, C, H, W]`` float32; ``k`` 0-dim int64 step index on x's device; ``z``
        explicit noise ``[B, C, H, W]`` or None; ``guided``/``draw_noise`` are static; ``run``
        holds this call's resolved backend and side stream (per call, not on ``self``, so one
        sampler can serve several threads or devices).
        Returns ``(x_next, logits, confidence, gate, finite_flags [3])``.
        """
        B = x.shape[0]
        # index_select with a [1] tensor, not table[k]: indexing by a 0-dim tensor makes dynamo
        # specialise on its value (k.item() guard) and recompile for every step
        k1 = k.reshape(1)
        coefs = tables["coefs"].index_select(0, k1)[0]  # [6]
        t = tables["timesteps"].index_select(0, k1).expand(B)  # [B] int64
        out, f, q, m, g, finite_f = self._models(x, t, k1, tables, guided, run)
        rng = torch.stack([rng_base[0], k, rng_base[1]])
        x_next = ops.guided_update(
            x,
            out,
            g,
            z,
            coefs,
            rng,
            prediction_type=self._prediction,
            clip_sample=bool(self.schedule.clip_sample),
            draw_noise=draw_noise,
            backend=run.backend,
            use_clipped_model_output=self.use_clipped_model_output,
        )
        finite = torch.stack([torch.isfinite(out).all(), finite_f, torch.isfinite(x_next).all()])
        return x_next, f, q, m, finite

    def _models(self, x, t, k1, tables, guided: bool, run: _Run):
        """The eps-model output and the guidance of one step: ``(out, f, q, m, G, finite_f)``.

        The protector's forward + VJP and the eps-model are independent given x_t: with
        ``run.side_stream`` they overlap (eager CUDA only; the side stream waits for x and the
        main stream for it).
        """
        if run.side_stream is None:
            out = self._eps_out(x, t)
            return (out, *self._guidance(x, t, k1, tables, guided, run))
        side = run.side_stream
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            f, q, m, g, finite_f = self._guidance(x, t, k1, tables, guided, run)
        out = self._eps_out(x, t)
        torch.cuda.current_stream(x.device).wait_stream(side)
        for tensor in (f, q, m, g, finite_f):
            if tensor is not None:
                tensor.record_stream(torch.cuda.current_stream(x.device))
        return out, f, q, m, g, finite_f

    def _dpm_step(self, x, x0_prev, k, tables, guided: bool, run: _Run):
        """One protected DPM-Solver++ step: eps-model, protector and one ``cpsample::dpm_update``.

        Same inputs as ``_step`` plus ``x0_prev`` (the previous step's x̂0, zeros on step 0);
        returns ``(x_next, x0, logits, confidence, gate, finite_flags [3])``.
        """
        B = x.shape[0]
        k1 = k.reshape(1)
        coefs = tables["coefs"].index_select(0, k1)[0]  # [7]
        t = tables["timesteps"].index_select(0, k1).expand(B)
        out, f, q, m, g, finite_f = self._models(x, t, k1, tables, guided, run)
        x_next, x0 = ops.dpm_update(
            x,
            out,
            g,
            x0_prev,
            coefs,
            prediction_type=self._prediction,
            clip_sample=bool(self.schedule.clip_sample),
            backend=run.backend,
        )
        finite = torch.stack([torch.isfinite(out).all(), finite_f, torch.isfinite(x_next).all()])
        return x_next, x0, f, q, m, finite

    def _eps_out(self, x, t):
        """Step 1 (docs/ALGORITHM.md §3): the eps-model's raw output, float32 and row-major for
        the update, in one copy at most (a bf16 and/or channels_last output is converted once)."""
        out = check_model_output(self._eps(x, t), x, None, None)
        return out.to(dtype=torch.float32, memory_format=torch.contiguous_format)

    def _guidance(self, x, t, k1, tables, guided: bool, run: _Run):
        """docs/ALGORITHM.md §3 steps 2–5: ``(logits, confidence, gate, G, finite_f)``
        (:func:`~cpsample_fast.step_guidance.guidance_term`)."""
        if not guided:
            return None, None, None, None, torch.ones((), dtype=torch.bool, device=x.device)
        scale_t = tables["scale"].index_select(0, k1).reshape(())
        return guidance_term(self._prot, x, t, scale_t, tables["one"], self.alpha, self._mode_id,
                             seed_backend=run.seed_backend)  # fmt: skip

    # ------------------------------------------------------------------ helpers
    def _device_tables(self, device) -> dict:
        key = str(device)
        if key not in self._tables:
            self._tables[key] = {
                "coefs": self._coef_table.to(device),
                "scale": self._scale_table.to(device),
                "timesteps": self.timesteps.to(device),
                "steps": torch.arange(self.num_inference_steps, device=device),
                "one": torch.ones((), dtype=torch.float32, device=device),
            }
        return self._tables[key]

    def _step_fn(self, guided: bool, draw_noise: bool):
        step = self._step if self.solver == "ddim" else self._dpm_step
        if not self.compile:
            return step
        key = (guided, draw_noise)
        if key not in self._compiled:
            mode = self.compile if isinstance(self.compile, str) else None
            options = self.compile_options if self.compile_backend == "inductor" else None
            if options and mode:
                # torch.compile takes a mode or options: merge the mode's own options in
                options = {**torch._inductor.list_mode_options(mode), **options}
                mode = None
            self._compiled[key] = torch.compile(
                step,
                fullgraph=True,
                mode=mode,
                backend=self.compile_backend,
                options=options or None,
            )
        return self._compiled[key]

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def sample(
        self,
        shape,
        *,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        step_noise: torch.Tensor | None = None,
        sample_offset: int = 0,
        return_trace: bool = False,
        device=None,
        callback=None,
        progress: bool = False,
        generator=None,
    ):
        """Draw protected samples (docs/ALGORITHM.md §3), same keyword arguments as
        ``reference_sample``.

        Args:
            shape: ``(B, C, H, W)``.
            seed: seed of the counter-based noise (docs/ALGORITHM.md §4).
            noise: explicit initial ``x_T`` ``[B, C, H, W]``.
            step_noise: explicit per-step ``z`` ``[steps, B, C, H, W]``.
            sample_offset: global index of the first sample (batch/rank invariance).
            return_trace: also return the per-step confidence/gate :class:`SamplingTrace`.
            device: where to sample (default: ``noise``'s device, else the eps-model's, else CPU).
            callback: optional ``callback(step, t, x)``; called after every step (it may sync).
            progress: show a tqdm bar over the steps (host-side only: it adds no sync).
            generator: a ``torch.Generator`` (or one per sample) that draws x_T and each step's
                noise exactly as diffusers' ``DDIMPipeline`` does (x_T in the eps-model's
                dtype, then one draw per step when η > 0), so scale 0 reproduces a pipeline run.
                Replaces ``seed``; not with ``noise``/``step_noise``.

        Returns:
            Final images ``[B, C, H, W]`` float32 (and the trace when asked).
        """
        shape = check_shape(shape)
        n = self.num_inference_steps
        check_noise_args(shape, n, noise, step_noise)
        device = torch.device(device) if device is not None else self._default_device(noise)
        backend = ops.resolve_backend(self.backend, device)
        run = _Run(
            backend=backend,
            # the seed op has torch and Triton kernels; the C++/CUDA builds have none
            seed_backend=backend if backend in ("torch", "triton") else "auto",
            side_stream=torch.cuda.Stream(device)
            if self.streams and device.type == "cuda"
            else None,
        )
        tables = self._device_tables(device)
        gen_draw = None
        if generator is not None:
            # diffusers-compatible noise (docs/ALGORITHM.md §4): x_T, then z per step if η > 0
            from .diffusers._noise import check_generator, randn_like_diffusers

            if noise is not None or step_noise is not None:
                raise ValueError("generator= replaces noise=/step_noise=; give one or the other")
            check_generator(generator, shape[0])
            gen_dtype = self._eps.dtype or torch.float32

            def gen_draw():
                return randn_like_diffusers(shape, generator, device, gen_dtype).float()

            noise = gen_draw()
        if noise is not None:
            x = noise.to(device=device, dtype=torch.float32).contiguous()
        else:
            x = _noise.initial_noise(seed, shape, sample_offset=sample_offset, device=device)
        if step_noise is not None:
            step_noise = step_noise.to(device=device, dtype=torch.float32)

        B = shape[0]
        rng_base = torch.tensor(
            [as_int64(check_seed("seed", seed)), as_int64(check_offset(sample_offset))],
            dtype=torch.int64,
            device=device,
        )
        draw = self.eta > 0 and step_noise is None and gen_draw is None
        trace = SamplingTrace.empty(self.timesteps, B, device) if return_trace else None
        first_bad = torch.full((3,), n, dtype=torch.int64, device=device)
        x0_prev = None  # multistep solvers: the previous step's x̂0
        graphs = self.uses_cuda_graphs and device.type == "cuda"
        steps = range(n)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="CPSample" if any(self._guided_steps) else "DDIM")
        for k in steps:
            k_t = tables["steps"][k]
            z = step_noise[k].contiguous() if (step_noise is not None and self.eta > 0) else None
            if gen_draw is not None and self.eta > 0:
                z = gen_draw()  # DDIMScheduler.step draws after the model call, as here
            guided = self._guided_steps[k]
            if graphs:
                # CUDA graphs: a new iteration; the previous replay's outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            if self.solver == "ddim":
                x, f, q, m, finite = self._step_fn(guided, draw)(
                    x, k_t, tables, rng_base, z, guided, draw, run
                )
            else:
                if x0_prev is None:
                    x0_prev = torch.zeros_like(x)  # read with weight 0 by the first step
                x, x0_prev, f, q, m, finite = self._step_fn(guided, draw)(
                    x, x0_prev, k_t, tables, guided, run
                )
                if graphs:
                    x0_prev = x0_prev.clone()  # the multistep state, out of the graph pool
            if graphs:
                x = x.clone()  # own x before the next replay reuses the graph's output pool
            first_bad = torch.where(~finite & (first_bad == n), k_t, first_bad)
            if trace is not None and guided:
                trace.logits[k] = f
                trace.confidence[k] = q
                trace.gate[k] = m
            if callback is not None:
                callback(k, int(self.timesteps[k]), x)
        self._raise_if_bad(first_bad)  # the loop's only host synchronisation
        return (x, trace) if return_trace else x

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether the compiled step replays CUDA graphs (its outputs live in a graph pool)."""
        if not self.compile or self.compile_backend != "inductor":
            return False
        mode = self.compile if isinstance(self.compile, str) else None
        options = {**(torch._inductor.list_mode_options(mode) if mode else {}),
                   **self.compile_options}  # fmt: skip
        return bool(options.get("triton.cudagraphs", False))

    def _default_device(self, noise):
        if noise is not None:
            return noise.device
        if isinstance(self.eps_model, torch.nn.Module):
            for p in self.eps_model.parameters():
                return p.device
        return torch.device("cpu")

    def _raise_if_bad(self, first_bad: torch.Tensor) -> None:
        bad = first_bad.tolist()
        k = min(bad)
        if k < self.num_inference_steps:
            source = _BAD_SOURCES[bad.index(k)]  # the earliest step; ties in pipeline order
            t = int(self.timesteps[k])
            raise FloatingPointError(
                f"{source} produced NaN/inf at step {k} (t={t}); check the model and its dtype"
            )
