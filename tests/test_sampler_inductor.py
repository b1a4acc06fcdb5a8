"""``CPSampler(compile=True)`` through the real compiler (inductor), against the reference.

tests/test_sampler.py counts graphs with a counting backend (fast); this file runs inductor
itself, as users do, once plainly and once with ``freezing`` (weights constant-folded), so a
lowering that changes the numbers cannot pass unnoticed. Small models keep the two compilations
to a few tens of seconds on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from test_sampler import _assert_partly_open, _noise, _rel

from cpsample_fast.reference import reference_sample
from cpsample_fast.sampler import CPSampler
from cpsample_fast.schedule import NoiseSchedule

SHAPE = (3, 1, 8, 8)


class TinyEps(torch.nn.Module):
    """conv → SiLU → conv with a timestep-dependent gain: a small graph that still fuses."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, t):
        gain = 1.0 + t.to(x.dtype).view(-1, 1, 1, 1) / 1000.0
        return self.b(torch.nn.functional.silu(self.a(x) * gain))


class TinyProtector(torch.nn.Module):
    """``f_b = gain·mean(tanh(conv(x_b))) + bias_b``: per-sample biases ±9 and 0 keep samples 0
    and 2 past the α = 0.001 gate (|f| > 6.9) and sample 1 short of it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.register_buffer("bias", torch.tensor([9.0, 0.0, -9.0]))

    def forward(self, x, t):
        return 2.0 * torch.tanh(self.conv(x)).flatten(1).mean(1) + self.bias


def _models():
    torch.manual_seed(0)
    return TinyEps().eval().requires_grad_(False), TinyProtector().eval().requires_grad_(False)


@pytest.mark.slow
@pytest.mark.parametrize("options", [None, {"freezing": True}], ids=["inductor", "freezing"])
def test_inductor_compiled_sampler_equals_reference(options):
    torch._dynamo.reset()
    unet, prot = _models()
    schedule = NoiseSchedule()
    x_T, z = _noise(n=3)
    kw = dict(num_inference_steps=3, eta=0.5, scale=30.0, alpha=0.001, mode="attract")
    ref, trace = reference_sample(
        unet, prot, schedule, SHAPE, noise=x_T, step_noise=z, return_trace=True, **kw
    )
    _assert_partly_open(trace)
    plain = reference_sample(unet, None, schedule, SHAPE, noise=x_T, step_noise=z,
                             **{**kw, "scale": 0.0})  # fmt: skip
    assert _rel(plain, ref) > 1e-4  # the guidance acted, so the comparison below covers it
    sampler = CPSampler(unet, prot, schedule, compile=True, compile_options=options, **kw)
    assert sampler.compile_backend == "inductor"
    out, fast_trace = sampler.sample(SHAPE, noise=x_T, step_noise=z, return_trace=True)
    err = _rel(out, ref)
    print(f"inductor options={options}: rel err vs reference {err:.2e}")
    assert torch.equal(fast_trace.gate, trace.gate)
    # float32 with inductor's own fusions and reduction orders: ~1e-7 per op, a few dozen ops
    assert err < 1e-5
    # a second call reuses the compiled step and gives the same bits
    assert torch.equal(sampler.sample(SHAPE, noise=x_T, step_noise=z), out)
