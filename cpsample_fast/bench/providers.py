"""The sampling providers of ``cpsample bench``: what each one runs, and which to run.

Names (used in the table, the CSV and ``--providers``):

- ``reference``: :func:`cpsample_fast.reference_sample` (imported, never rewritten), float32
  models;
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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def base_name(self) -> str:
        """The reference provider this one is compared with (same model dtype)."""
        return "reference+bf16" if self.bf16 else "reference"


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
