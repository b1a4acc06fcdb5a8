"""GPU-only checks of the fast sampler: CUDA backends, side streams, CUDA graphs (``cuda`` marker).

On a machine without a GPU these are skipped; ``benchmarks/device_check.sh`` runs them where one
exists. The one CPU-reachable rule of these options (streams refuse compile) is checked at the
bottom.
"""

from __future__ import annotations

import pytest
import torch
from test_sampler import (  # tests/ is on sys.path under pytest
    SHAPE,
    _assert_partly_open,
    _models,
    _noise,
    _rel,
)

from cpsample_fast import ops
from cpsample_fast.reference import reference_sample
from cpsample_fast.sampler import CPSampler
from cpsample_fast.schedule import NoiseSchedule

KW = dict(num_inference_steps=5, eta=0.6, scale=3.0, alpha=0.02, mode="attract")


def _cuda_setup():
    unet, prot = _models()
    x_T, z = _noise()
    return unet.cuda(), prot.cuda(), x_T.cuda(), z.cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_cuda_backends_equal_reference(backend):
    if backend not in ops.available_backends("cuda"):
        pytest.skip(f"{backend} not available on this GPU build")
    unet, prot, x_T, z = _cuda_setup()
    schedule = NoiseSchedule()
    ref, ref_trace = reference_sample(
        unet, prot, schedule, SHAPE, noise=x_T, step_noise=z, return_trace=True, **KW
    )
    _assert_partly_open(ref_trace)
    fast = CPSampler(unet, prot, schedule, backend=backend, **KW).sample(
        SHAPE, noise=x_T, step_noise=z
    )
    err = _rel(fast, ref)
    print(f"cuda {backend}: rel err {err:.2e}")
    assert err < 1e-5
    # in-kernel Philox on the GPU draws what the CPU torch Philox draws
    seeded_gpu = CPSampler(unet, prot, schedule, backend=backend, **KW).sample(SHAPE, seed=5)
    seeded_ref = reference_sample(unet, prot, schedule, SHAPE, seed=5, device="cuda", **KW)
    assert _rel(seeded_gpu, seeded_ref) < 1e-5


@pytest.mark.cuda
def test_side_stream_equals_single_stream():
    unet, prot, x_T, z = _cuda_setup()
    schedule = NoiseSchedule()
    one = CPSampler(unet, prot, schedule, **KW).sample(SHAPE, noise=x_T, step_noise=z)
    two = CPSampler(unet, prot, schedule, streams=True, **KW).sample(SHAPE, noise=x_T, step_noise=z)
    assert torch.equal(one, two)


@pytest.mark.cuda
def test_cuda_graphs_replay_draws_fresh_noise():
    unet, prot, x_T, _ = _cuda_setup()
    schedule = NoiseSchedule()
    eager = CPSampler(unet, prot, schedule, **KW)
    graphs = CPSampler(unet, prot, schedule, compile="reduce-overhead", **KW)
    for seed in (1, 2):  # a replay with a new seed must not repeat the captured noise
        a = eager.sample(SHAPE, noise=x_T, seed=seed)
        b = graphs.sample(SHAPE, noise=x_T, seed=seed)
        print(f"seed {seed}: cudagraph rel err {_rel(b, a):.2e}")
        assert _rel(b, a) < 1e-4


@pytest.mark.cuda
def test_streams_run_the_protector_on_a_side_stream():
    """streams=True really moves the protector off the current stream, and changes no bit."""
    unet, prot, x_T, z = _cuda_setup()
    schedule = NoiseSchedule()
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x, t):
            seen.append(torch.cuda.current_stream(x.device).cuda_stream)
            return prot(x, t)

    main = torch.cuda.current_stream().cuda_stream
    plain = CPSampler(unet, Recording(), schedule, **KW).sample(SHAPE, noise=x_T, step_noise=z)
    assert seen and set(seen) == {main}
    seen.clear()
    streamed = CPSampler(unet, Recording(), schedule, streams=True, **KW).sample(
        SHAPE, noise=x_T, step_noise=z
    )
    print(f"protector streams: {sorted(set(seen))}, main {main}")
    assert seen and main not in seen
    assert torch.equal(plain, streamed)


def test_streams_with_compile_is_refused():
    unet, prot = _models()
    with pytest.raises(ValueError, match="streams=True works in eager mode only"):
        CPSampler(unet, prot, NoiseSchedule(), streams=True, compile=True, **KW)
    with pytest.raises(ValueError, match="streams=True works in eager mode only"):
        CPSampler(unet, prot, NoiseSchedule(), streams=True, compile="reduce-overhead", **KW)
