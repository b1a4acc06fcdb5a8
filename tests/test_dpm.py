"""DPM-Solver++(2M): diffusers-exact tables and loop, the fused multistep op on every backend,
the guided loop against diffusers' scheduler wrapped by ``ProtectedScheduler``, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cpsample_fast as cps
from cpsample_fast import ops, solvers
from cpsample_fast.ops import _torch
from cpsample_fast.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

from diffusers_tiny import C, H, LinearProtector, tiny_unet  # noqa: E402

from cpsample_fast.integrations.diffusers import DiffusersEpsModel  # noqa: E402


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _dpm_scheduler(schedule, **kw):
    """diffusers' DPMSolverMultistepScheduler configured from the schedule, as
    ``DPMSolverMultistepScheduler.from_config(ddim_scheduler.config)`` does."""
    return diffusers.DPMSolverMultistepScheduler.from_config(
        diffusers.DDIMScheduler(**schedule.to_config()).config, **kw
    )


def _diffusers_loop(unet, scheduler, n, x, add=None):
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(x, t).sample
        if add is not None:
            out = add(out, t, x)
        x = scheduler.step(out, t, x).prev_sample
    return x


# ------------------------------------------------------------------------- schedule tables


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [2, 5, 10, 14, 15, 25, 50])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_timesteps_sigmas_and_order_equal_diffusers(spacing, n, final):
    sched = NoiseSchedule.linear(1000, timestep_spacing=spacing, steps_offset=1)
    ref = _dpm_scheduler(sched, final_sigmas_type=final)
    ref.set_timesteps(n)
    assert torch.equal(solvers.dpm_timesteps(sched, n), ref.timesteps)
    assert torch.equal(solvers.dpm_sigmas(sched, n, final), ref.sigmas)
    # which steps diffusers runs first order: read from its step() on a dummy model output
    table = solvers.dpm_coef_table(sched, n, final)
    assert table.shape == (n, solvers.NUM_DPM_COEFS) and table.dtype == torch.float32
    first = solvers.dpm_first_order(n, final)
    assert first[0] and first[-1] == (n < 15 or final == "zero")
    assert all(not f for f in first[1:-1])
    assert ((table[:, 4] == 0) == torch.tensor(first)).all()  # C = 0 exactly on first order


def test_coefficients_give_diffusers_step_bit_for_bit():
    """One step through the op's formula with the table row equals scheduler.step's bits."""
    sched = NoiseSchedule.linear(1000, clip_sample=False)
    n = 7
    ref = _dpm_scheduler(sched)
    ref.set_timesteps(n)
    table = solvers.dpm_coef_table(sched, n)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, C, H, H, generator=g)
    prev = torch.zeros_like(x)
    for k, t in enumerate(ref.timesteps):
        o = torch.randn(3, C, H, H, generator=g)
        want = ref.step(o, t, x).prev_sample
        got, prev = _torch.dpm_update(x, o, None, prev, table[k], 0, False)
        assert torch.equal(got, want), k
        x = want


# ------------------------------------------------------------------------- vs diffusers


@pytest.mark.parametrize(
    "prediction,spacing",
    [("epsilon", "linspace"), ("v_prediction", "linspace"), ("epsilon", "leading"),
     ("sample", "trailing"), ("v_prediction", "trailing")],
)  # fmt: skip
@pytest.mark.parametrize("n", [5, 12, 25])
def test_unguided_equals_diffusers_loop(prediction, spacing, n):
    unet = tiny_unet()
    sched = NoiseSchedule.linear(
        1000, prediction_type=prediction, timestep_spacing=spacing, clip_sample=False
    )
    x_T = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(n))
    want = _diffusers_loop(unet, _dpm_scheduler(sched), n, x_T.clone())
    eps = DiffusersEpsModel(unet)
    kw = dict(num_inference_steps=n, noise=x_T, solver="dpmsolver++")
    ref = cps.reference_sample(eps, None, sched, x_T.shape, **kw)
    fast = cps.CPSampler(eps, None, sched, num_inference_steps=n, solver="dpmsolver++",
                         backend="torch").sample(x_T.shape, noise=x_T)  # fmt: skip
    assert _rel(ref, want) <= 1e-5
    assert _rel(fast, want) <= 1e-5


@pytest.mark.parametrize("n", [6, 16])  # 16: the last step stays second order with sigma_min
@pytest.mark.parametrize("guided", [False, True])
def test_final_sigmas_type_sigma_min_equals_diffusers(n, guided):
    """``final_sigmas_type="sigma_min"`` as diffusers: the last step lands on σ at t = 0 (and is
    first order only below 15 steps), unguided against diffusers' loop and guided against
    diffusers' scheduler wrapped by ProtectedScheduler; every loop differs from "zero"."""
    from cpsample_fast.diffusers import ProtectedScheduler

    unet = tiny_unet()
    sched = NoiseSchedule.linear(1000, clip_sample=False)
    x_T = torch.randn(3, C, H, H, generator=torch.Generator().manual_seed(n))
    eps = DiffusersEpsModel(unet)
    prot = LinearProtector(k=2.0) if guided else None
    kw = dict(scale=30.0, alpha=0.2, mode="repel") if guided else {}
    dpm = _dpm_scheduler(sched, final_sigmas_type="sigma_min")
    want = _diffusers_loop(unet, ProtectedScheduler(dpm, prot, **kw) if guided else dpm, n,
                           x_T.clone())  # fmt: skip
    opts = dict(num_inference_steps=n, solver="dpmsolver++", final_sigmas_type="sigma_min", **kw)
    ref = cps.reference_sample(eps, prot, sched, x_T.shape, noise=x_T, **opts)
    zero = cps.reference_sample(eps, prot, sched, x_T.shape, noise=x_T,
                                **{**opts, "final_sigmas_type": "zero"})  # fmt: skip
    tol = 1e-4 if guided else 1e-5
    assert _rel(ref, want) <= tol
    assert _rel(zero, want) > 5 * max(_rel(ref, want), 1e-7)  # the option changes the result
    for backend in ("torch", "cpp"):
        if backend not in ops.available_backends("cpu"):
            continue
        fast = cps.CPSampler(eps, prot, sched, backend=backend, **opts).sample(x_T.shape, noise=x_T)
        assert _rel(fast, want) <= tol, backend


def test_guided_equals_protected_diffusers_scheduler():
    """Guided dpmsolver++ == diffusers' DPMSolverMultistepScheduler wrapped by the package's
    ProtectedScheduler (branch `diffusers`), with a gate open on part of the batch."""
    from cpsample_fast.diffusers import ProtectedScheduler

    unet = tiny_unet()
    prot = LinearProtector(k=2.0)
    sched = NoiseSchedule.linear(1000, clip_sample=False)
    n = 10
    x_T = torch.randn(4, C, H, H, generator=torch.Generator().manual_seed(3))
    kw = dict(scale=30.0, alpha=0.2, mode="repel")
    wrapped = ProtectedScheduler(_dpm_scheduler(sched), prot, **kw)
    want = _diffusers_loop(unet, wrapped, n, x_T.clone())
    assert wrapped.trace.gate.any() and not wrapped.trace.gate.all()
    eps = DiffusersEpsModel(unet)
    unguided = cps.reference_sample(
        eps, None, sched, x_T.shape, num_inference_steps=n, noise=x_T, solver="dpmsolver++"
    )
    assert _rel(unguided, want) > 1e-2  # the guidance matters here
    ref, trace = cps.reference_sample(
        eps, prot, sched, x_T.shape, num_inference_steps=n, noise=x_T, solver="dpmsolver++",
        return_trace=True, **kw,
    )  # fmt: skip
    assert _rel(ref, want) <= 1e-4
    assert torch.equal(trace.gate, wrapped.trace.gate)
    for backend in ("torch", "cpp"):
        if backend not in ops.available_backends("cpu"):
            continue
        fast = cps.CPSampler(eps, prot, sched, num_inference_steps=n, solver="dpmsolver++",
                             backend=backend, **kw).sample(x_T.shape, noise=x_T)  # fmt: skip
        assert _rel(fast, want) <= 1e-4, backend


# ------------------------------------------------------------------------- backends vs reference


def _closed_form_setup(prediction="epsilon", clip=True):
    class Eps(torch.nn.Module):
        def forward(self, x, t):
            return torch.tanh(x) * (0.5 + t.float().view(-1, 1, 1, 1) / 2000.0)

    class Prot(LinearProtector):  # any dtype (the float64 reference)
        def forward(self, x, t):
            return self.k * (x.flatten(1) @ self.w.to(x.dtype))

    sched = NoiseSchedule.linear(1000, prediction_type=prediction, clip_sample=clip)
    return Eps(), Prot(k=3.0), sched


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_every_backend_equals_reference(prediction):
    eps, prot, sched = _closed_form_setup(prediction, clip=True)
    n = 6
    x_T = torch.randn(3, C, H, H, generator=torch.Generator().manual_seed(1)) * 1.5
    kw = dict(scale=40.0, alpha=0.3, mode="entropy")
    ref = cps.reference_sample(eps, prot, sched, x_T.shape, num_inference_steps=n, noise=x_T,
                               solver="dpmsolver++", **kw)  # fmt: skip
    ref64 = cps.reference_sample(eps, prot, sched, x_T.shape, num_inference_steps=n, noise=x_T,
                                 solver="dpmsolver++", dtype=torch.float64, **kw)  # fmt: skip
    assert _rel(ref, ref64.float()) <= 5e-5  # float32 rounding through 6 guided steps
    for backend in ops.available_backends("cpu"):
        got = cps.CPSampler(eps, prot, sched, num_inference_steps=n, solver="dpmsolver++",
                            backend=backend, **kw).sample(x_T.shape, noise=x_T)  # fmt: skip
        assert _rel(got, ref) <= 1e-5, backend  # float32 rounding, well inside ref vs ref64


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction", [0, 1, 2])
@pytest.mark.parametrize("guided", [False, True])
def test_op_backends_agree_bit_for_bit(clip, prediction, guided):
    """The shared per-element formula: torch, C++ and Triton (interpreter) give the same bits,
    on a first-order and a second-order row, with values that hit the clip."""
    sched = NoiseSchedule.linear(1000)
    table = solvers.dpm_coef_table(sched, 8)
    g = torch.Generator().manual_seed(prediction)
    shape = (3, 2, 5, 7)  # odd sizes: masked tails
    x, o, prev = (torch.randn(shape, generator=g) * 2 for _ in range(3))
    G = torch.randn(shape, generator=g) if guided else None
    for k in (0, 3):
        want = _torch.dpm_update(x, o, G, prev, table[k], prediction, clip)
        for backend in ops.available_backends("cpu"):
            got = ops.dpm_update(x, o, G, prev, table[k], prediction_type=prediction,
                                 clip_sample=clip, backend=backend)  # fmt: skip
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (backend, k)
    if clip:  # the model's own x0 is clipped; the guidance acts after the clip
        plain = _torch.dpm_update(x, o, None, prev, table[k], prediction, clip)[1]
        assert plain.abs().max() <= 1.0
        if guided:
            alpha_s, sigma_s = table[k][0], table[k][1]
            assert torch.allclose(want[1], plain - (sigma_s / alpha_s) * G, atol=1e-6)


def test_op_opcheck_and_strides():
    sched = NoiseSchedule.linear(1000)
    coefs = solvers.dpm_coef_table(sched, 5)[2]
    g = torch.Generator().manual_seed(0)
    x, o, prev, G = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    for backend in ["torch"] + [b for b in ops.available_backends("cpu") if b != "torch"]:
        args = (x, o, G, prev, coefs, 0, True, backend)
        torch.library.opcheck(torch.ops.cpsample.dpm_update.default, args)
        torch.library.opcheck(
            torch.ops.cpsample.dpm_update.default, (x, o, None, prev, coefs, 1, False, backend)
        )
    cl = x.to(memory_format=torch.channels_last)
    a = ops.dpm_update(cl, o, G, prev, coefs, prediction_type=0, clip_sample=True)
    b = ops.dpm_update(x, o, G, prev, coefs, prediction_type=0, clip_sample=True)
    assert torch.equal(a[0], b[0])


def test_op_gradient_equals_autograd_of_the_torch_formula():
    """The op's registered backward (shared by every backend) against plain autograd."""
    sched = NoiseSchedule.linear(1000)
    coefs = solvers.dpm_coef_table(sched, 5)[2]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 1, 2, 3, generator=g) * 2 for _ in range(4)]  # x, o, G, prev
    for clip in (False, True):
        for backend in ops.available_backends("cpu"):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            out, x0 = ops.dpm_update(
                *leaves, coefs, prediction_type=1, clip_sample=clip, backend=backend
            )
            got = torch.autograd.grad(out.sum() + 2 * x0.sum(), leaves)
            ref = [t.clone().requires_grad_(True) for t in inputs]
            a, b = _torch.dpm_update(ref[0], ref[1], ref[2], ref[3], coefs, 1, clip)
            want = torch.autograd.grad(a.sum() + 2 * b.sum(), ref)
            for u, v in zip(got, want):
                assert torch.equal(u, v), backend
            assert any(w.abs().sum() > 0 for w in want)


# ------------------------------------------------------------------------- compile / graphs


def test_compile_builds_one_graph_for_all_steps():
    eps, prot, sched = _closed_form_setup()
    n = 6
    x_T = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(2))
    kw = dict(scale=40.0, alpha=0.3, mode="repel", solver="dpmsolver++", backend="torch")
    eager = cps.CPSampler(eps, prot, sched, num_inference_steps=n, **kw)
    want = eager.sample(x_T.shape, noise=x_T)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    comp = cps.CPSampler(eps, prot, sched, num_inference_steps=n, compile=True, **kw)
    comp.compile_backend = counting_backend
    got = comp.sample(x_T.shape, noise=x_T)
    got2 = comp.sample(x_T.shape, noise=x_T)
    assert len(graphs) == 1
    assert torch.equal(got, want) and torch.equal(got2, want)


def test_seeded_batch_invariance():
    eps, prot, sched = _closed_form_setup()
    s = cps.CPSampler(eps, prot, sched, num_inference_steps=4, scale=40.0, alpha=0.3,
                      solver="dpmsolver++")  # fmt: skip
    whole = s.sample((4, C, H, H), seed=5)
    part = s.sample((2, C, H, H), seed=5, sample_offset=2)
    # the same noise per sample whatever the batch (the protector's matmul may round per batch)
    assert torch.allclose(whole[2:], part, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- bad input


def test_bad_input_clear_errors():
    eps, prot, sched = _closed_form_setup()
    with pytest.raises(ValueError, match="solver must be one of"):
        cps.CPSampler(eps, None, sched, num_inference_steps=5, solver="euler")
    with pytest.raises(ValueError, match="solver must be one of"):
        cps.reference_sample(eps, None, sched, (1, C, H, H), num_inference_steps=5, solver="dpm")
    with pytest.raises(ValueError, match="eta=0.5 .*deterministic"):
        cps.CPSampler(eps, None, sched, num_inference_steps=5, eta=0.5, solver="dpmsolver++")
    with pytest.raises(ValueError, match="num_inference_steps=1 .*second-order"):
        cps.CPSampler(eps, None, sched, num_inference_steps=1, solver="dpmsolver++")
    with pytest.raises(ValueError, match="num_inference_steps=1 .*second-order"):
        cps.reference_sample(eps, None, sched, (1, C, H, H), num_inference_steps=1,
                             solver="dpmsolver++")  # fmt: skip
    trailing = NoiseSchedule.linear(1000, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="timestep_spacing='trailing' gives 62"):
        cps.CPSampler(eps, None, trailing, num_inference_steps=61, solver="dpmsolver++")
    leading = NoiseSchedule.linear(1000, timestep_spacing="leading")
    with pytest.raises(ValueError, match="timestep_spacing='leading' gives repeated"):
        cps.CPSampler(eps, None, leading, num_inference_steps=1000, solver="dpmsolver++")
    with pytest.raises(ValueError, match="use_clipped_model_output"):
        cps.CPSampler(eps, None, sched, num_inference_steps=5, solver="dpmsolver++",
                      use_clipped_model_output=True)  # fmt: skip
    with pytest.raises(ValueError, match="final_sigmas_type must be one of"):
        cps.CPSampler(eps, None, sched, num_inference_steps=5, solver="dpmsolver++",
                      final_sigmas_type="min")  # fmt: skip
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min' is a DPM-Solver"):
        cps.reference_sample(eps, None, sched, (1, C, H, H), num_inference_steps=5,
                             final_sigmas_type="sigma_min")  # fmt: skip
    coefs = solvers.dpm_coef_table(sched, 5)[1]
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"dpm_update: coefs must have shape \[7\]"):
        ops.dpm_update(x, x, None, x, coefs[:6], prediction_type=0, clip_sample=False)
    with pytest.raises(ValueError, match="dpm_update: x0_prev must have x's shape"):
        ops.dpm_update(x, x, None, x[:, :1], coefs, prediction_type=0, clip_sample=False)
    with pytest.raises(TypeError, match="dpm_update: model_out must be float32"):
        ops.dpm_update(x, x.double(), None, x, coefs, prediction_type=0, clip_sample=False)
    assert np.isfinite(coefs.numpy()).all()


def test_solver_timesteps_is_what_the_sampler_visits():
    eps, prot, sched = _closed_form_setup()
    for solver in solvers.SOLVERS:
        s = cps.CPSampler(eps, None, sched, num_inference_steps=7, solver=solver)
        assert torch.equal(solvers.solver_timesteps(sched, 7, solver), s.timesteps)
    assert not torch.equal(solvers.solver_timesteps(sched, 7, "ddim"), s.timesteps)


_LOWER_DPM_TO_SM90 = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cpsample_fast.ops import _triton as T

target = GPUTarget("cuda", 90, 32)
sig = {n: "*fp32" for n in ("x_ptr", "o_ptr", "g_ptr", "prev_ptr", "coefs_ptr", "out_ptr",
                            "x0_ptr")}
sig["numel"] = "i32"
names = ("PREDICTION_TYPE", "CLIP_SAMPLE", "HAS_GUIDANCE", "BLOCK")
sig.update(dict.fromkeys(names, "constexpr"))
div16 = {(i,): [["tt.divisibility", 16]] for i in range(8)}
out = []
for values in [(0, True, True, 1024), (1, False, False, 1024), (2, True, False, 1024)]:
    src = ASTSource(T._dpm_update_kernel, sig, constexprs=dict(zip(names, values)), attrs=div16)
    k = triton.compile(src, target=target, options={"num_warps": 4, "enable_fp_fusion": False})
    out.append({"p": values[0], "clip": values[1], "ptx": k.asm["ptx"],
                "cubin": len(k.asm["cubin"])})
print(json.dumps(out))
"""


def test_triton_dpm_kernel_compiles_for_sm90():
    """The DPM kernel lowers to PTX/cubin for sm_90 without a GPU (fresh process, no
    interpreter): IEEE division, no FMA contraction, NaN-keeping clip, 128-bit accesses."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's bundled ptxas not found")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _LOWER_DPM_TO_SM90], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        ptx = r["ptx"]
        assert r["cubin"] > 0
        assert "div.full" not in ptx and "fma.rn.f32" not in ptx
        if r["p"] == 0:
            assert "div.rn.f32" in ptx
        if r["clip"]:
            assert "min.f32" not in ptx and "max.f32" not in ptx
        assert "st.global.v4.b32" in ptx


@pytest.mark.cuda
def test_cuda_backends_and_cuda_graphs_equal_cpu_reference():
    eps, prot, sched = _closed_form_setup()
    eps, prot = eps.cuda(), prot.cuda()
    n = 6
    x_T = torch.randn(3, C, H, H, generator=torch.Generator().manual_seed(1)).cuda()
    kw = dict(scale=40.0, alpha=0.3, mode="entropy", solver="dpmsolver++")
    ref = cps.reference_sample(eps, prot, sched, x_T.shape, num_inference_steps=n, noise=x_T,
                               **{k: v for k, v in kw.items()})  # fmt: skip
    for backend in ops.available_backends("cuda"):
        got = cps.CPSampler(eps, prot, sched, num_inference_steps=n, backend=backend,
                            **kw).sample(x_T.shape, noise=x_T)  # fmt: skip
        assert _rel(got, ref) <= 1e-5, backend
    graphs = cps.CPSampler(eps, prot, sched, num_inference_steps=n, compile="reduce-overhead",
                           **kw)  # fmt: skip
    first = graphs.sample(x_T.shape, noise=x_T)
    again = graphs.sample(x_T.shape, noise=x_T)  # replays: the multistep state is a tensor
    assert _rel(first, ref) <= 1e-5 and torch.equal(first, again)


def test_cli_final_sigmas_type(tmp_path, capsys):
    """`cpsample sample --final-sigmas-type`: refused with DDIM (one line, exit 2, the option
    named), recorded in sample.json with dpmsolver++."""
    from cpsample_fast.cli.__main__ import main as cli_main

    base = ["sample", "--model", "digits", "--num-samples", "2", "--steps", "3",
            "--final-sigmas-type", "sigma_min"]  # fmt: skip
    assert cli_main([*base, "--out", str(tmp_path / "ddim")]) == 2
    assert "final_sigmas_type='sigma_min' is a DPM-Solver++ option" in capsys.readouterr().err
    out = tmp_path / "dpm"
    assert cli_main([*base, "--solver", "dpmsolver++", "--out", str(out)]) == 0
    import json

    result = json.loads((out / "sample.json").read_text())
    assert result["solver"] == "dpmsolver++" and result["final_sigmas_type"] == "sigma_min"
