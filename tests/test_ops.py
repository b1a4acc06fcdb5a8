"""Fused ops: torch spec vs a float64 evaluation of the formula; registration, dispatch, errors."""

import importlib
import math

import pytest
import torch
from test_guidance import ALPHA_PAPER, LOGITS, assert_matches_closed_form  # tests/ on sys.path

from cpsample_fast import guidance, noise, ops

# The package exports the function `guided_update`, which shadows the submodule's attribute name.
gu_module = importlib.import_module("cpsample_fast.ops._backends")

SHAPE = (3, 3, 5, 7)  # odd batch, odd sample shape
F32_EPS = torch.finfo(torch.float32).eps


def make_coefs(alpha_bar=0.64, alpha_bar_prev=0.81, eta=0.7, clip_range=1.0):
    """(sa, s1, sp, d, sigma, clip) from ᾱ_t, ᾱ' and η as DDIM defines them (docs/ALGORITHM.md §3
    step 7)."""
    sigma = (
        eta
        * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        * math.sqrt(1 - alpha_bar / alpha_bar_prev)
    )
    d = math.sqrt(1 - alpha_bar_prev - sigma**2)
    vals = [math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar), math.sqrt(alpha_bar_prev), d, sigma]
    return torch.tensor([*vals, clip_range], dtype=torch.float32)


def make_inputs(shape=SHAPE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(shape, generator=gen)  # large enough that clipping bites
    o = torch.randn(shape, generator=gen)
    g = 0.5 * torch.randn(shape, generator=gen)
    z = torch.randn(shape, generator=gen)
    return x, o, g, z


def reference_update_f64(x, o, g, z, coefs, prediction_type, clip_sample):
    """docs/ALGORITHM.md §3 steps 5–7 in float64, written from the paper's form, not the kernels'
    form."""
    x, o = x.double(), o.double()
    sa, s1, sp, d, sigma, c = coefs.double().tolist()
    if prediction_type == 0:
        eps = o
    elif prediction_type == 1:
        eps = sa * o + s1 * x
    else:
        eps = (x - sa * o) / s1
    x0 = (x - s1 * eps) / sa  # the model's own x̂0 (docs/ALGORITHM.md §1)
    if clip_sample:
        x0 = x0.clamp(-c, c)  # diffusers' clip of the model's prediction
    # guidance after the clip (docs/ALGORITHM.md §3 step 6): ε̂ = ε + G and x̂0 moves with it
    eps_hat = eps if g is None else eps + g.double()
    x0_hat = x0 if g is None else x0 - (s1 / sa) * g.double()
    out = sp * x0_hat + d * eps_hat
    if z is not None:
        out = out + sigma * z.double()
    return out


NOISE_MODES = ("none", "tensor", "draw")


def _case_args(noise_mode, z):
    explicit = z if noise_mode == "tensor" else None
    return explicit, noise_mode == "draw"


@pytest.mark.parametrize("prediction_type", [0, 1, 2])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("with_guidance", [False, True])
@pytest.mark.parametrize("noise_mode", NOISE_MODES)
def test_torch_matches_float64_formula(prediction_type, clip_sample, with_guidance, noise_mode):
    x, o, g, z = make_inputs()
    coefs = make_coefs()
    rng = torch.tensor([17, 4, 2])
    g = g if with_guidance else None
    explicit, draw = _case_args(noise_mode, z)
    out = ops.guided_update(
        x,
        o,
        g,
        explicit,
        coefs,
        rng,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        draw_noise=draw,
        backend="torch",
    )
    z_ref = {"none": None, "tensor": z, "draw": noise.step_noise(17, 4, SHAPE, 2)}[noise_mode]
    ref = reference_update_f64(x, o, g, z_ref, coefs, prediction_type, clip_sample)
    err = (out.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), x.abs().max().item(), 1.0)
    print(f"p={prediction_type} clip={clip_sample} g={with_guidance} z={noise_mode}: "
          f"max abs err {err:.2e} (scale {scale:.2f})")  # fmt: skip
    assert out.dtype == torch.float32 and out.shape == SHAPE
    # float32 has ~6e-8 relative rounding per op; the chain has < 10 ops, with 1/s1 ≈ 1.7 gain.
    assert err <= 16 * F32_EPS * scale
    if clip_sample:
        assert not torch.equal(
            out,
            ops.guided_update(
                x, o, g, explicit, coefs, rng, prediction_type=prediction_type,
                clip_sample=False, draw_noise=draw, backend="torch",
            ),
        )  # fmt: skip


def test_explicit_noise_wins_over_draw_and_string_prediction_type():
    x, o, g, z = make_inputs()
    coefs, rng = make_coefs(), torch.tensor([1, 2, 3])
    a = ops.guided_update(x, o, g, z, coefs, rng, prediction_type="v_prediction",
                          clip_sample=True, draw_noise=True, backend="torch")  # fmt: skip
    b = ops.guided_update(x, o, g, z, coefs, rng, prediction_type=1,
                          clip_sample=True, draw_noise=False, backend="torch")  # fmt: skip
    assert torch.equal(a, b)


def test_drawn_noise_is_batch_invariant():
    x, o, g, _ = make_inputs((5, 2, 3, 3))
    coefs = make_coefs()
    full = ops.guided_update(x, o, g, None, coefs, torch.tensor([9, 3, 10]), prediction_type=0,
                             clip_sample=False, draw_noise=True, backend="torch")  # fmt: skip
    for b in (0, 4):
        alone = ops.guided_update(x[b : b + 1], o[b : b + 1], g[b : b + 1], None, coefs,
                                  torch.tensor([9, 3, 10 + b]), prediction_type=0,
                                  clip_sample=False, draw_noise=True, backend="torch")  # fmt: skip
        assert torch.equal(alone[0], full[b])


def test_no_guidance_equals_zero_guidance():
    x, o, _, z = make_inputs()
    coefs, rng = make_coefs(), torch.tensor([0, 0, 0])
    kw = dict(prediction_type=2, clip_sample=True, draw_noise=False, backend="torch")
    a = ops.guided_update(x, o, None, z, coefs, rng, **kw)
    b = ops.guided_update(x, o, torch.zeros_like(x), z, coefs, rng, **kw)
    assert torch.equal(a, b)


def test_op_accepts_other_strides_that_inductor_may_pass():
    """The op and its wrapper take channels_last inputs (a channels_last protector's gradient,
    inductor's layout optimisation) and return the same row-major result."""
    x, o, g, z = (t.reshape(3, 3, 5, 7) for t in make_inputs((3, 3, 5, 7)))
    coefs, rng = make_coefs(), torch.tensor([0, 0, 0])
    args = (coefs, rng, 0, True, False)
    want = torch.ops.cpsample.guided_update(x, o, g, z, *args, "torch")
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, o, g, z)]
    for backend in ops.available_backends("cpu"):
        got = torch.ops.cpsample.guided_update(*cl, *args, backend)
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        got = ops.guided_update(*cl, coefs, rng, prediction_type=0, clip_sample=True,
                                draw_noise=False, backend=backend)  # fmt: skip
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Other backends through the same op
# ---------------------------------------------------------------------------------------------


def _ext_built() -> bool:
    return "cpp" in ops.available_backends("cpu")


@pytest.mark.skipif(not _ext_built(), reason="cpsample_fast._C not built (make build)")
@pytest.mark.parametrize("prediction_type", [0, 1, 2])
@pytest.mark.parametrize("noise_mode", NOISE_MODES)
def test_cpp_backend_matches_torch(prediction_type, noise_mode):
    x, o, g, z = make_inputs()
    coefs, rng = make_coefs(), torch.tensor([2**40 + 3, 7, 5])
    explicit, draw = _case_args(noise_mode, z)
    kw = dict(prediction_type=prediction_type, clip_sample=True, draw_noise=draw)
    ref = ops.guided_update(x, o, g, explicit, coefs, rng, backend="torch", **kw)
    out = ops.guided_update(x, o, g, explicit, coefs, rng, backend="cpp", **kw)
    err = (out - ref).abs().max().item()
    print(f"cpp vs torch, p={prediction_type} z={noise_mode}: max abs err {err:.2e}")
    assert err <= 16 * F32_EPS * max(ref.abs().max().item(), 1.0)


def test_backend_resolution_and_available_backends(monkeypatch):
    cpu = torch.device("cpu")
    names = ops.available_backends(cpu)
    assert names[-1] in ("torch", "triton") and "torch" in names
    assert ops.resolve_backend("auto", cpu) == names[0]
    assert names[0] == ("cpp" if _ext_built() else "torch")
    assert ops.resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="cuda"):
        ops.resolve_backend("cuda", cpu)
    # Without the extension, cpp says how to build it and auto falls back to torch.
    monkeypatch.setattr(gu_module, "get_ext", lambda: None)
    monkeypatch.setattr(gu_module, "_RESOLVED", {})
    assert ops.available_backends(cpu)[0] == "torch"
    assert ops.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match="make build"):
        ops.resolve_backend("cpp", cpu)
    x, o, _, _ = make_inputs()
    with pytest.raises(RuntimeError, match="make build"):
        ops.guided_update(x, o, None, None, make_coefs(), torch.zeros(3, dtype=torch.int64),
                          prediction_type=0, clip_sample=False, draw_noise=False,
                          backend="cpp")  # fmt: skip


@pytest.mark.parametrize(
    "arch,capability,covers",
    [
        ("90", (9, 0), True),
        ("90", (10, 0), True),  # compute_90 PTX, JIT-compiled by the driver
        ("90", (8, 9), False),
        ("90-real", (10, 0), False),  # machine code only: same major
        ("80-real", (8, 6), True),
        ("86-real", (8, 0), False),
        ("90a", (9, 0), True),
        ("90a", (10, 0), False),  # arch-specific: exactly sm_90
        ("100f", (10, 3), True),
        ("100f", (12, 0), False),
        ("80-virtual", (12, 0), True),
        ("all-major", (7, 5), True),
    ],
)
def test_cuda_arch_coverage_rules(arch, capability, covers):
    from cpsample_fast.ops import _ext

    assert _ext.arch_covers(arch, capability) is covers
    with pytest.raises(ValueError, match="CUDA architecture"):
        _ext.arch_covers("sm90", capability)


def test_cuda_backend_offered_only_when_the_built_archs_cover_the_gpu(monkeypatch):
    """A `_C` built for sm_80 on an sm_90 GPU: no `cuda` backend, and asking for it says which
    archs to build."""

    class FakeExt:
        def __init__(self, archs):
            self.archs = archs

        def build_info(self):
            return {"cuda": True, "cuda_archs": self.archs}

    cuda = torch.device("cuda")
    monkeypatch.setattr(gu_module, "_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(gu_module._triton_impl, "supports_device", lambda device: False)
    for archs, offered in [("80-real", False), ("80-real,90-real", True), ("80", True)]:
        monkeypatch.setattr(gu_module, "get_ext", lambda archs=archs: FakeExt(archs))
        monkeypatch.setattr(gu_module, "_RESOLVED", {})
        names = ops.available_backends(cuda)
        assert ("cuda" in names) is offered, (archs, names)
        if not offered:
            with pytest.raises(RuntimeError, match=r"CPSAMPLE_CUDA_ARCHS=\"90\""):
                ops.resolve_backend("cuda", cuda)
        else:
            assert ops.resolve_backend("cuda", cuda) == "cuda"


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


def test_opcheck_guided_update():
    x, o, g, z = make_inputs((3, 2, 3, 5))
    coefs, rng = make_coefs(), torch.tensor([5, 1, 0])
    for args in [
        (x, o, g, z, coefs, rng, 0, True, False, "torch"),
        (x, o, None, None, coefs, rng, 1, False, True, "torch"),
        (x, o, g, None, coefs, rng, 2, True, False, "auto"),
    ]:
        torch.library.opcheck(torch.ops.cpsample.guided_update.default, args)


def test_opcheck_guidance_seed():
    logits = torch.tensor([-9.0, -0.3, 0.0, 2.0, 12.0])
    for mode in range(3):
        torch.library.opcheck(
            torch.ops.cpsample.guidance_seed.default,
            (logits, torch.tensor(3.0), 0.01, mode, "torch"),
        )


def test_compiled_calls_op_without_recompiling_per_step():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    x, o, g, _ = make_inputs()
    table = torch.stack([make_coefs(0.5, 0.7), make_coefs(0.7, 0.9), make_coefs(0.9, 1.0)])

    def step(x, o, g, table, k, seed):
        rng = torch.stack([seed, k, torch.zeros_like(k)])
        # index_select, not table[k]: AOT turns a 0-dim index tensor into a data-dependent int.
        coefs = table.index_select(0, k.reshape(1)).reshape(6)
        c, _, _ = ops.guidance_seed(g[:, 0, 0, 0], coefs[1] * 10.0, 0.5, "repel",
                                    backend="torch")  # fmt: skip
        gg = g * c[:, None, None, None]
        return ops.guided_update(x, o, gg, None, coefs, rng, prediction_type=0,
                                 clip_sample=True, draw_noise=True, backend="torch")  # fmt: skip

    fn = torch.compile(step, backend=counter, fullgraph=True)
    seed = torch.tensor(3)
    for k in range(3):
        kt = torch.tensor(k)
        out = fn(x, o, g, table, kt, seed)
        err = (out - step(x, o, g, table, kt, seed)).abs().max().item()
        assert err == 0.0, err
    print(f"frames compiled over 3 steps: {counter.frame_count}")
    assert counter.frame_count == 1


@pytest.mark.parametrize("prediction_type", [0, 1, 2])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("noise_mode", ["none", "tensor"])
def test_backward_matches_autograd_of_torch_spec(prediction_type, clip_sample, noise_mode):
    from cpsample_fast.ops import _torch as torch_impl

    x, o, g, z = make_inputs()
    coefs, rng = make_coefs(), torch.tensor([0, 0, 0])
    z = z if noise_mode == "tensor" else None
    gy = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    leaves = [t.clone().requires_grad_(True) for t in (x, o, g) + ((z,) if z is not None else ())]
    out = ops.guided_update(*leaves[:3], leaves[3] if z is not None else None, coefs, rng,
                            prediction_type=prediction_type, clip_sample=clip_sample,
                            draw_noise=False, backend="torch")  # fmt: skip
    grads = torch.autograd.grad(out, leaves, gy)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref_out = torch_impl.guided_update(*ref_leaves[:3], ref_leaves[3] if z is not None else None,
                                       coefs, rng, prediction_type, clip_sample, False)  # fmt: skip
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, gy)
    for name, a, b in zip(("x", "model_out", "guidance", "noise"), grads, ref_grads):
        err = (a - b).abs().max().item()
        print(f"p={prediction_type} clip={clip_sample}: grad {name} max abs err {err:.2e}")
        assert err <= 8 * F32_EPS * max(b.abs().max().item(), 1.0)
    if clip_sample:  # the clamp was active somewhere: it changed the model_out gradient
        unclipped = torch_impl.guided_update_backward(gy, x, o, g, coefs, prediction_type, False)
        assert not torch.equal(unclipped[1], grads[1])


def test_opcheck_with_gradients():
    x, o, g, z = (t.requires_grad_(True) for t in make_inputs((3, 2, 3, 5)))
    coefs, rng = make_coefs(), torch.tensor([5, 1, 0])
    for args in [
        (x, o, g, z, coefs, rng, 0, True, False, "torch"),
        (x, o, None, None, coefs, rng, 2, True, True, "auto"),
    ]:
        torch.library.opcheck(torch.ops.cpsample.guided_update.default, args)


# ---------------------------------------------------------------------------------------------
# guidance_seed op
# ---------------------------------------------------------------------------------------------


def _seed_backends():
    names = ["auto", "torch", "cpp", "cuda"]  # cpp/cuda have no seed kernel: they run torch
    from cpsample_fast.ops import _triton

    if _triton.supports_device(torch.device("cpu")):
        names.append("triton")  # the interpreter, as tests/conftest.py sets it up
    return names


@pytest.mark.parametrize("backend", _seed_backends())
@pytest.mark.parametrize("mode", guidance.MODES)
@pytest.mark.parametrize("alpha", [ALPHA_PAPER, 0.05])
def test_guidance_seed_op_matches_closed_form(mode, backend, alpha):
    """Each backend of the op against float64 closed-form values (tests/test_guidance.py), not
    against guidance.py, which the torch backend simply calls."""
    scale = 1000.0 * 0.6
    c, q, m = ops.guidance_seed(torch.tensor(LOGITS), torch.tensor(scale), alpha, mode,
                                backend=backend)  # fmt: skip
    assert_matches_closed_form(c, q, m, LOGITS, scale, alpha, mode)
    assert m.any() and not m.all()
    # Integer mode ids are the same op.
    c2, _, _ = ops.guidance_seed(torch.tensor(LOGITS), torch.tensor(scale), alpha,
                                 guidance.mode_id(mode), backend=backend)  # fmt: skip
    assert torch.equal(c2, c)


def test_guidance_seed_bad_inputs():
    logits, scale = torch.zeros(3), torch.tensor(1.0)
    with pytest.raises(TypeError, match="logits"):
        ops.guidance_seed(torch.zeros(3, dtype=torch.int64), scale, 0.1)
    with pytest.raises(ValueError, match="logits"):
        ops.guidance_seed(torch.zeros(3, 1), scale, 0.1)
    with pytest.raises(TypeError, match="scale_t"):
        ops.guidance_seed(logits, 1.0, 0.1)
    with pytest.raises(TypeError, match="scale_t"):
        ops.guidance_seed(logits, torch.ones(1), 0.1)
    with pytest.raises(ValueError, match="alpha"):
        ops.guidance_seed(logits, scale, 0.7)
    with pytest.raises(ValueError, match="mode"):
        ops.guidance_seed(logits, scale, 0.1, "push")
    with pytest.raises(ValueError, match="mode"):
        ops.guidance_seed(logits, scale, 0.1, 3)
    with pytest.raises(ValueError, match="backend"):
        ops.guidance_seed(logits, scale, 0.1, backend="fast")


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _good():
    x, o, g, z = make_inputs((3, 2, 3, 5))
    return dict(x=x, model_out=o, guidance=g, noise=z, coefs=make_coefs(),
                rng=torch.tensor([1, 2, 3]))  # fmt: skip


def _call(args, **kw):
    opts = dict(prediction_type=0, clip_sample=True, draw_noise=False, backend="torch")
    opts.update(kw)
    return ops.guided_update(
        args["x"], args["model_out"], args["guidance"], args["noise"], args["coefs"],
        args["rng"], **opts,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name,bad,exc,match",
    [
        ("x", lambda a: a["x"].double(), TypeError, "x must be float32"),
        ("x", lambda a: torch.tensor(1.0), ValueError, "batch dimension"),
        ("model_out", lambda a: a["model_out"].half(), TypeError, "model_out must be float32"),
        ("model_out", lambda a: a["model_out"][:2], ValueError, "model_out must have x's shape"),
        ("guidance", lambda a: a["guidance"].reshape(3, -1), ValueError, "guidance must have"),
        ("guidance", lambda a: 0.0, TypeError, "guidance must be a tensor"),
        ("noise", lambda a: a["noise"].to(torch.int32), TypeError, "noise must be float32"),
        ("coefs", lambda a: a["coefs"].double(), TypeError, "coefs must be"),
        ("coefs", lambda a: a["coefs"][:5], ValueError, r"coefs must have shape \[6\]"),
        ("coefs", lambda a: a["coefs"][None], ValueError, r"coefs must have shape \[6\]"),
        ("rng", lambda a: a["rng"].int(), TypeError, "rng must be torch.int64"),
        ("rng", lambda a: torch.zeros(4, dtype=torch.int64), ValueError, r"rng must have shape"),
        ("rng", lambda a: torch.zeros(6, dtype=torch.int64)[::2], ValueError, "rng must be contig"),
    ],
)
def test_bad_tensor_inputs(name, bad, exc, match):
    args = _good()
    args[name] = bad(args)
    with pytest.raises(exc, match=match):
        _call(args)


def test_bad_option_inputs():
    args = _good()
    with pytest.raises(ValueError, match="prediction_type"):
        _call(args, prediction_type=3)
    with pytest.raises(ValueError, match="prediction_type"):
        _call(args, prediction_type="x0")
    with pytest.raises(TypeError, match="prediction_type"):
        _call(args, prediction_type=1.0)
    with pytest.raises(TypeError, match="clip_sample"):
        _call(args, clip_sample=1)
    with pytest.raises(TypeError, match="draw_noise"):
        _call(args, draw_noise=None)
    with pytest.raises(ValueError, match="backend"):
        _call(args, backend="numpy")
    # The registered op validates too (direct callers bypass the Python wrapper).
    with pytest.raises(ValueError, match="backend"):
        torch.ops.cpsample.guided_update(
            args["x"], args["model_out"], None, None, args["coefs"], args["rng"], 0, True, False,
            "numpy",
        )  # fmt: skip


@pytest.mark.cuda
def test_device_mismatch_and_cuda_backends():
    args = _good()
    args["coefs"] = args["coefs"].cuda()
    with pytest.raises(ValueError, match="coefs must be on cpu"):
        _call(args)
    x, o, g, z = (t.cuda() for t in make_inputs())
    coefs, rng = make_coefs().cuda(), torch.tensor([3, 1, 0], device="cuda")
    ref = ops.guided_update(x, o, g, None, coefs, rng, prediction_type=0, clip_sample=True,
                            draw_noise=True, backend="torch")  # fmt: skip
    for backend in ops.available_backends("cuda"):
        out = ops.guided_update(x, o, g, None, coefs, rng, prediction_type=0, clip_sample=True,
                                draw_noise=True, backend=backend)  # fmt: skip
        err = (out - ref).abs().max().item()
        print(f"{backend} vs torch on cuda: {err:.2e}")
        assert err <= 1e-5 * max(ref.abs().max().item(), 1.0)
