"""CPSampler against reference_sample (the spec in code) with explicit and seeded noise."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from cpsample_fast import ops
from cpsample_fast.models import SmallUNet
from cpsample_fast.protector import ProtectorNet
from cpsample_fast.reference import reference_sample
from cpsample_fast.sampler import CPSampler
from cpsample_fast.schedule import NoiseSchedule

SHAPE = (3, 1, 8, 8)  # odd batch
N_STEPS = 5
CPU_BACKENDS = [b for b in ("torch", "cpp", "triton") if b in ops.available_backends("cpu")]


class Sharpened(torch.nn.Module):
    """A protector whose logits are spread out, so the gate is open for some samples only."""

    def __init__(self, net, gain=40.0, bias=0.0):
        super().__init__()
        self.net, self.gain, self.bias = net, gain, bias

    def forward(self, x, t):
        return self.gain * self.net(x, t) + self.bias


def _models(seed=0):
    torch.manual_seed(seed)
    unet = SmallUNet("tiny").eval().requires_grad_(False)
    for w in unet.parameters():  # the output conv starts at zero; make the model non-trivial
        if w.dim() > 1 and not w.any():
            w.normal_(0.0, 0.05)
    prot = ProtectorNet(in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2))
    return unet, Sharpened(prot.eval().requires_grad_(False), bias=-11.0)


def _noise(seed=1, n=N_STEPS, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn((n, *shape), generator=g)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _assert_partly_open(trace):
    """Some samples guided and some not at one step at least, so a sampler that ignored the
    gate (guidance always on, or never) cannot match the reference."""
    gate = trace.gate  # [steps, B]
    mixed = gate.any(1) & ~gate.all(1)
    print(f"gate open {gate.float().mean().item():.2f}; steps with mixed samples "
          f"{mixed.int().tolist()}")  # fmt: skip
    assert mixed.any(), gate.int().tolist()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "mode,eta,prediction,alpha",
    [
        ("repel", 0.0, "epsilon", 0.001),  # the paper's α: the gate opens for |f| > 6.9
        ("attract", 0.6, "v_prediction", 0.02),
        ("entropy", 1.0, "sample", 0.02),
    ],
)
def test_fast_equals_reference_explicit_noise(backend, mode, eta, prediction, alpha):
    unet, prot = _models()
    schedule = NoiseSchedule(prediction_type=prediction, clip_sample=prediction == "sample")
    x_T, z = _noise()
    kw = dict(num_inference_steps=N_STEPS, eta=eta, scale=3.0, alpha=alpha, mode=mode)
    ref, ref_trace = reference_sample(
        unet, prot, schedule, SHAPE, noise=x_T, step_noise=z, return_trace=True, **kw
    )
    fast, trace = CPSampler(unet, prot, schedule, backend=backend, **kw).sample(
        SHAPE, noise=x_T, step_noise=z, return_trace=True
    )
    err = _rel(fast, ref)
    gate_frac = ref_trace.gate.float().mean().item()
    print(f"{backend} {mode} eta={eta} {prediction}: rel err {err:.2e}, gate open {gate_frac:.2f}")
    _assert_partly_open(ref_trace)
    assert err < 1e-5
    assert torch.equal(trace.gate, ref_trace.gate)
    torch.testing.assert_close(trace.confidence, ref_trace.confidence, rtol=1e-5, atol=1e-6)
    # guidance changed the result (so the comparison above covers it)
    plain = reference_sample(
        unet, None, schedule, SHAPE, noise=x_T, step_noise=z, **{**kw, "scale": 0.0}
    )
    assert _rel(plain, ref) > 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeded_noise_matches_reference_and_is_batch_invariant(backend):
    unet, prot = _models()
    schedule = NoiseSchedule()
    kw = dict(num_inference_steps=N_STEPS, eta=1.0, scale=3.0, alpha=0.001)
    ref, ref_trace = reference_sample(unet, prot, schedule, SHAPE, seed=7, return_trace=True, **kw)
    _assert_partly_open(ref_trace)
    sampler = CPSampler(unet, prot, schedule, backend=backend, **kw)
    fast = sampler.sample(SHAPE, seed=7)
    err = _rel(fast, ref)
    print(f"{backend}: seeded rel err {err:.2e}")
    assert err < 1e-5
    # sample 2 of the batch, drawn alone with sample_offset=2 (same up to the models' rounding)
    alone = sampler.sample((1, *SHAPE[1:]), seed=7, sample_offset=2)
    torch.testing.assert_close(alone[0], fast[2], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sampler.sample(SHAPE, seed=8), fast)


def test_plain_ddim_when_no_protector_or_zero_scale():
    unet, prot = _models()
    schedule = NoiseSchedule()
    x_T, z = _noise()
    kw = dict(num_inference_steps=N_STEPS, eta=0.5)
    ref = reference_sample(unet, None, schedule, SHAPE, noise=x_T, step_noise=z, **kw)
    for p, s in [(None, 5.0), (prot, 0.0)]:
        out = CPSampler(unet, p, schedule, scale=s, alpha=0.1, **kw).sample(
            SHAPE, noise=x_T, step_noise=z
        )
        assert _rel(out, ref) < 1e-6


def test_progress_bar_and_callback(capsys):
    unet, prot = _models()
    x_T, _ = _noise()
    seen = []
    sampler = CPSampler(unet, prot, NoiseSchedule(), num_inference_steps=3, scale=1.0, alpha=0.1)
    out = sampler.sample(SHAPE, noise=x_T, progress=True, callback=lambda k, t, x: seen.append(k))
    assert seen == [0, 1, 2]
    assert "CPSample" in capsys.readouterr().err
    assert torch.equal(out, sampler.sample(SHAPE, noise=x_T))


def test_fp16_protector_at_paper_scale_stays_finite():
    """The VJP is seeded with m·w·sign(f) (≤ 1) and scaled afterwards in float32: seeding with
    s·√(1-ᾱ)·... pushed ~1e3-times larger values through the fp16 backward, which overflowed."""
    unet, prot = _models()
    x_T, _ = _noise()
    schedule = NoiseSchedule(timestep_spacing="trailing")
    # the paper's scale; α = 1e-4 (gate at |f| > 9.2) leaves this protector's gate partly open
    kw = dict(num_inference_steps=4, scale=1000.0, alpha=1e-4, mode="attract")
    ref, ref_trace = reference_sample(
        unet, prot.half(), schedule, SHAPE, noise=x_T, return_trace=True, **kw
    )
    _assert_partly_open(ref_trace)
    fast = CPSampler(unet, prot.half(), schedule, **kw).sample(SHAPE, noise=x_T)
    assert torch.isfinite(fast).all()
    print("fp16 protector rel err", _rel(fast, ref))
    assert _rel(fast, ref) < 1e-2  # fp16 backward rounding differs (scaled before vs after)


def test_seed_range_and_offset_checks():
    unet, _ = _models()
    sampler = CPSampler(unet, None, NoiseSchedule(), num_inference_steps=2, eta=1.0)
    big = sampler.sample(SHAPE, seed=2**64 - 1)  # the noise functions take [0, 2**64)
    ref = reference_sample(unet, None, NoiseSchedule(), SHAPE, num_inference_steps=2, eta=1.0,
                           seed=2**64 - 1)  # fmt: skip
    assert _rel(big, ref) < 1e-5
    with pytest.raises(ValueError, match="sample_offset"):
        sampler.sample(SHAPE, noise=torch.zeros(SHAPE), sample_offset=-1)
    with pytest.raises(ValueError, match="seed"):
        sampler.sample(SHAPE, seed=2**64)


def test_cuda_graph_modes_are_recognised():
    unet, _ = _models()
    s = NoiseSchedule()
    for compile, options, expect in [
        (False, None, False),
        (True, None, False),
        ("reduce-overhead", None, True),
        ("max-autotune", None, True),
        ("max-autotune-no-cudagraphs", None, False),
        (True, {"triton.cudagraphs": True}, True),
        ("reduce-overhead", {"freezing": True}, True),
    ]:
        sampler = CPSampler(unet, None, s, num_inference_steps=2, compile=compile,
                            compile_options=options)  # fmt: skip
        assert sampler.uses_cuda_graphs is expect, (compile, options)


def test_guidance_range_skips_the_protector_outside_it():
    unet, prot = _models()
    schedule = NoiseSchedule()
    x_T, _ = _noise()
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x, t):
            calls.append(int(t[0]))
            return prot(x, t)

    kw = dict(num_inference_steps=N_STEPS, scale=3.0, alpha=0.001, guidance_range=(0, 500))
    ref, ref_trace = reference_sample(unet, prot, schedule, SHAPE, noise=x_T, return_trace=True,
                                      **kw)  # fmt: skip
    _assert_partly_open(ref_trace)
    fast, trace = CPSampler(unet, Counting(), schedule, **kw).sample(
        SHAPE, noise=x_T, return_trace=True
    )
    assert _rel(fast, ref) < 1e-5
    ts = schedule.timesteps(N_STEPS).tolist()
    assert calls == [t for t in ts if t <= 500]
    skipped = [k for k, t in enumerate(ts) if t > 500]
    assert torch.isnan(trace.confidence[skipped]).all() and not trace.gate[skipped].any()


def test_bf16_models_follow_the_flash_attention_rule():
    """bf16 + channels_last models: error vs fp64 ≤ 2× the reference's own error in bf16."""
    unet, prot = _models()
    schedule = NoiseSchedule()
    x_T, _ = _noise()
    kw = dict(num_inference_steps=N_STEPS, scale=3.0, alpha=0.001)
    exact, exact_trace = reference_sample(
        unet.double(), prot.double(), schedule, SHAPE, noise=x_T, dtype=torch.float64,
        return_trace=True, **kw,
    )  # fmt: skip
    _assert_partly_open(exact_trace)
    cl = torch.channels_last
    unet16 = unet.to(torch.bfloat16, memory_format=cl)
    prot16 = prot.to(torch.bfloat16, memory_format=cl)
    ref16 = reference_sample(unet16, prot16, schedule, SHAPE, noise=x_T, **kw)
    fast16 = CPSampler(unet16, prot16, schedule, **kw).sample(SHAPE, noise=x_T)
    e_ref, e_fast = _rel(ref16, exact), _rel(fast16, exact)
    print(f"bf16 error vs fp64: reference {e_ref:.2e}, fast {e_fast:.2e}")
    assert fast16.dtype == torch.float32
    assert e_fast <= 2 * e_ref + 1e-6


def test_compile_one_graph_for_all_steps_and_equal_to_eager():
    torch._dynamo.reset()
    unet, prot = _models()
    schedule = NoiseSchedule()
    x_T, _ = _noise()
    kw = dict(num_inference_steps=4, eta=1.0, scale=3.0, alpha=0.001)
    eager, trace = CPSampler(unet, prot, schedule, **kw).sample(
        SHAPE, noise=x_T, seed=3, return_trace=True
    )
    _assert_partly_open(trace)
    counter = torch._dynamo.testing.CompileCounter()
    sampler = CPSampler(unet, prot, schedule, compile=True, **kw)
    sampler.compile_backend = counter  # count graphs instead of running inductor (fast CI)
    out = sampler.sample(SHAPE, noise=x_T, seed=3)
    out2 = sampler.sample(SHAPE, noise=x_T, seed=3)
    print("frames", counter.frame_count, "ops", counter.op_count)
    assert counter.frame_count == 1, "the step must compile to one graph reused by every step"
    assert torch.equal(out, out2)
    assert _rel(out, eager) < 1e-5


class NaNAt(torch.nn.Module):
    def __init__(self, inner, t_bad):
        super().__init__()
        self.inner, self.t_bad = inner, t_bad

    def forward(self, x, t):
        out = self.inner(x, t)
        bad = (t == self.t_bad).view(-1, *([1] * (out.dim() - 1)))
        return torch.where(bad, torch.nan, out)


def test_nan_reported_once_with_model_and_step():
    unet, prot = _models()
    schedule = NoiseSchedule()
    t_bad = int(schedule.timesteps(N_STEPS)[3])
    kw = dict(num_inference_steps=N_STEPS, scale=3.0, alpha=0.2)
    with pytest.raises(
        FloatingPointError, match=f"eps_model produced NaN/inf at step 3 \\(t={t_bad}\\)"
    ):
        CPSampler(NaNAt(unet, t_bad), prot, schedule, **kw).sample(SHAPE)
    t_bad = int(schedule.timesteps(N_STEPS)[1])
    with pytest.raises(FloatingPointError, match="protector produced NaN/inf at step 1"):
        CPSampler(unet, NaNAt(prot, t_bad), schedule, **kw).sample(SHAPE)


def test_bad_input_errors():
    unet, prot = _models()
    s = NoiseSchedule()
    with pytest.raises(TypeError, match="scale must be given with a protector"):
        CPSampler(unet, prot, s, num_inference_steps=4, alpha=0.001)
    with pytest.raises(ValueError, match="alpha"):
        CPSampler(unet, prot, s, num_inference_steps=4, scale=1.0, alpha=0.7)
    with pytest.raises(ValueError, match="scale"):
        CPSampler(unet, prot, s, num_inference_steps=4, scale=-2.0, alpha=0.1)
    with pytest.raises(ValueError, match="eta"):
        CPSampler(unet, prot, s, num_inference_steps=4, scale=1.0, alpha=0.1, eta=-1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        CPSampler(unet, prot, s, num_inference_steps=0, scale=1.0, alpha=0.1)
    with pytest.raises(ValueError, match="backend"):
        CPSampler(unet, prot, s, num_inference_steps=4, scale=1.0, alpha=0.1, backend="metal")
    with pytest.raises(ValueError, match="guidance_range"):
        CPSampler(
            unet, prot, s, num_inference_steps=4, scale=1.0, alpha=0.1, guidance_range=(500, 100)
        )
    sampler = CPSampler(unet, prot, s, num_inference_steps=4, scale=1.0, alpha=0.1)
    with pytest.raises(ValueError, match="shape"):
        sampler.sample((3, 1, 8))
    with pytest.raises(ValueError, match="noise must have shape"):
        sampler.sample(SHAPE, noise=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="eps_model returned shape"):
        CPSampler(lambda x, t: x[:, :, :4], None, s, num_inference_steps=2).sample(SHAPE)
    with pytest.raises(ValueError, match="protector must return logits"):
        CPSampler(
            unet, lambda x, t: x.flatten(1), s, num_inference_steps=2, scale=1.0, alpha=0.1
        ).sample(SHAPE)


def test_channels_last_detected_past_ambiguous_first_weight():
    """A 1-channel model's first conv weight [C, 1, 3, 3] is contiguous in both formats; the
    layout must be read from the next weights."""
    from cpsample_fast.model_caller import model_memory_format

    unet, _ = _models()
    assert model_memory_format(unet) is torch.contiguous_format
    assert model_memory_format(unet.to(memory_format=torch.channels_last)) is torch.channels_last
