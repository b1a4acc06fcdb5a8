"""Models the project did not write (issue 8 item 3): a diffusers ``UNet2DModel`` as eps-model and
a plain conv protector written here, over fp32/bf16 × contiguous/channels_last × eager/compile ×
clip on/off. In every cell the fast sampler equals ``reference_sample`` (bf16: the flash-attention
rule, error vs an fp64 reference at most 2× the reference's own bf16 error).

Compiled cells trace the whole step with dynamo (``fullgraph=True``, the ``eager`` backend: no
code generation) except one, marked slow, that runs the real inductor compiler.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cpsample_fast import CPSampler, ops
from cpsample_fast.reference import reference_sample
from cpsample_fast.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

SHAPE = (4, 3, 8, 8)
STEPS = 3
KW = dict(num_inference_steps=STEPS, eta=0.5, scale=40.0, alpha=0.35, mode="repel")


class UNetEps(nn.Module):
    """A diffusers ``UNet2DModel`` as ``eps_model(x, t)`` (its output is ``.sample``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(101)
        self.unet = diffusers.UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        )

    def forward(self, x, t):
        return self.unet(x, t).sample


class ConvProtector(nn.Module):
    """A plain conv classifier: Conv-GroupNorm-SiLU ×2, mean pool, linear head; t enters as a
    scalar feature."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(202)
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.SiLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.GroupNorm(4, 16),
            nn.SiLU(),
        )
        self.head = nn.Linear(17, 1)
        with torch.no_grad():
            self.head.weight.mul_(8.0)  # confident enough that some gates open

    def forward(self, x, t):
        h = self.body(x).mean((2, 3))
        tt = (t.to(h.dtype) / 1000.0).view(-1, 1)
        return self.head(torch.cat([h, tt], 1)).squeeze(1)


_CACHE: dict = {}


def _base():
    if "models" not in _CACHE:
        _CACHE["models"] = (UNetEps().eval(), ConvProtector().eval())
        gen = torch.Generator().manual_seed(7)
        _CACHE["noise"] = (
            torch.randn(SHAPE, generator=gen),
            torch.randn((STEPS, *SHAPE), generator=gen),
        )
    return _CACHE["models"], _CACHE["noise"]


def _models(dtype, channels_last: bool):
    (unet, prot), _ = _base()
    unet2, prot2 = UNetEps().eval(), ConvProtector().eval()
    unet2.load_state_dict(unet.state_dict())
    prot2.load_state_dict(prot.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return unet2.to(dtype, memory_format=fmt), prot2.to(dtype, memory_format=fmt)


def _exact(clip: bool):
    """The float64 reference of each clip setting (the bf16 rule's yardstick)."""
    key = ("exact", clip)
    if key not in _CACHE:
        unet, prot = _models(torch.float64, False)
        _, (noise, step_noise) = _base()
        _CACHE[key] = reference_sample(
            unet,
            prot,
            NoiseSchedule(clip_sample=clip),
            SHAPE,
            noise=noise,
            step_noise=step_noise,
            dtype=torch.float64,
            **KW,
        )
    return _CACHE[key]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CELLS = [
    (dtype, cl, compile_, clip)
    for dtype in ("fp32", "bf16")
    for cl in (False, True)
    for compile_ in (False, True)
    for clip in (False, True)
]


def _ids(cell):
    dtype, cl, compile_, clip = cell
    return (
        f"{dtype}-{'cl' if cl else 'contig'}-{'compile' if compile_ else 'eager'}-"
        f"{'clip' if clip else 'noclip'}"
    )


@pytest.mark.parametrize("cell", CELLS, ids=_ids)
def test_foreign_models_match_reference(cell):
    dtype_name, cl, compile_, clip = cell
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    unet, prot = _models(dtype, cl)
    _, (noise, step_noise) = _base()
    schedule = NoiseSchedule(clip_sample=clip)
    ref, trace = reference_sample(
        unet, prot, schedule, SHAPE, noise=noise, step_noise=step_noise, return_trace=True, **KW
    )
    assert trace.gate.any() and not trace.gate.all(), trace.gate  # some samples gated, some not
    torch._dynamo.reset()
    sampler = CPSampler(unet, prot, schedule, compile=compile_, **KW)
    if compile_:
        sampler.compile_backend = "eager"  # dynamo's full-graph trace, no code generation
    fast, ftrace = sampler.sample(SHAPE, noise=noise, step_noise=step_noise, return_trace=True)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    if dtype == torch.float32:
        err = _rel(fast, ref)
        print(f"{_ids(cell)}: rel err vs reference {err:.2e}")
        assert torch.equal(ftrace.gate, trace.gate)
        assert err < 1e-4
    else:
        exact = _exact(clip)
        e_ref, e_fast = _rel(ref, exact), _rel(fast, exact)
        print(f"{_ids(cell)}: bf16 error vs fp64: reference {e_ref:.2e}, fast {e_fast:.2e}")
        assert e_fast <= 2 * e_ref + 1e-6


@pytest.mark.slow
def test_foreign_models_with_inductor_channels_last_bf16():
    """The real compiler (inductor), bf16 channels_last, clip on: the headline configuration."""
    unet, prot = _models(torch.bfloat16, True)
    _, (noise, step_noise) = _base()
    schedule = NoiseSchedule()
    ref = reference_sample(unet, prot, schedule, SHAPE, noise=noise, step_noise=step_noise, **KW)
    torch._dynamo.reset()
    fast = CPSampler(unet, prot, schedule, compile=True, **KW).sample(
        SHAPE, noise=noise, step_noise=step_noise
    )
    exact = _exact(True)
    e_ref, e_fast = _rel(ref, exact), _rel(fast, exact)
    print(f"inductor bf16 channels_last: error vs fp64: reference {e_ref:.2e}, fast {e_fast:.2e}")
    assert e_fast <= 2 * e_ref + 1e-6


@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("cl", [False, True], ids=["contig", "cl"])
def test_foreign_models_every_backend(backend, dtype_name, cl):
    """Each fused-update backend with the foreign models, both dtypes and memory formats (clip
    on, eager): equal to the reference (fp32) or within the bf16 rule."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    unet, prot = _models(dtype, cl)
    _, (noise, step_noise) = _base()
    schedule = NoiseSchedule(clip_sample=True)
    ref, trace = reference_sample(
        unet, prot, schedule, SHAPE, noise=noise, step_noise=step_noise, return_trace=True, **KW
    )
    sampler = CPSampler(unet, prot, schedule, backend=backend, **KW)
    fast, ftrace = sampler.sample(SHAPE, noise=noise, step_noise=step_noise, return_trace=True)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    if dtype == torch.float32:
        assert torch.equal(ftrace.gate, trace.gate)
        assert _rel(fast, ref) < 1e-4
    else:
        exact = _exact(True)
        assert _rel(fast, exact) <= 2 * _rel(ref, exact) + 1e-6
