"""What one sampling benchmark runs on: its settings, the models, the shared ``x_T``, and a
zero-argument sampling call per provider.

``cpsample bench`` (:func:`cpsample_fast.bench.run_sampler_bench`), the pytest-benchmark files
and ``benchmarks/profile_sampler.py`` all time the calls :meth:`SamplingContext.make_runner`
builds, so every way in measures the same thing. Only public entry points are called:
``cpsample_fast.reference_sample`` and ``cpsample_fast.CPSampler``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..reference import reference_sample
from ..validation import check_int
from .accuracy import ReferenceCheck
from .configs import BenchConfig, build_models, convert_model, default_schedule
from .providers import PROVIDERS, ProviderSpec


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

    def __post_init__(self) -> None:
        for name, lo in (("batch", 1), ("steps", 1), ("repeats", 1), ("warmup", 0)):
            check_int(name, getattr(self, name), lo)
        check_int("accuracy_batch", self.accuracy_batch, 1)
        unknown = [name for name in self.providers if name not in PROVIDERS]
        if unknown:
            raise ValueError(f"providers: unknown {unknown}; known: {list(PROVIDERS)}")

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


class SamplingContext:
    """Models, schedule, shapes and the shared initial noise of one run.

    ``make_runner(spec)`` gives a provider's zero-argument sampling call;
    ``accuracy`` (:class:`cpsample_fast.bench.accuracy.ReferenceCheck`) checks a provider's
    samples against the reference and the float64 baseline.
    """

    def __init__(self, settings: SamplerBenchSettings):
        self.settings = s = settings
        self.device = s.device
        self.shape = s.config.shape(s.batch)
        self.schedule = default_schedule()
        self.eps32, self.prot32 = build_models(s.config, s.device, seed=s.seed)
        self._bf16 = None
        gen = torch.Generator(device="cpu").manual_seed(s.seed + 1)
        self.x_T = torch.randn(self.shape, generator=gen).to(s.device)  # [B, C, H, W]
        self.accuracy = ReferenceCheck(self)

    def models(self, bf16: bool, fp32_protector: bool = False):
        """``(eps_model, protector)`` in float32, or bf16 + channels_last (converted once)."""
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
        """The sampling options every provider shares (η = 0; scale 0 when unguided)."""
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
                    eps, prot, self.schedule, self.shape, noise=self.x_T, device=self.device,
                    **kwargs,
                )  # fmt: skip

            return run_reference, "eager torch"
        from .. import ops
        from ..sampler import CPSampler

        s = self.settings
        sampler = CPSampler(
            eps, prot, self.schedule, backend=s.backend, compile=spec.compile, **kwargs
        )
        backend = ops.resolve_backend(s.backend, self.device)

        def run_fused():
            return sampler.sample(self.shape, noise=self.x_T, device=self.device)

        return run_fused, backend
