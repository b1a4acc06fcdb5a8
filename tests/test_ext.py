"""The compiled extension cpsample_fast._C: C++ CPU kernels against independent references.

Skipped when `_C` is not built (`make build`), except the loader test, which needs no build.
References here are written from docs/CONTRACTS.md alone: a plain-Python/numpy Philox, the
Random123 known-answer vectors, and the fused-update formula evaluated in float64 and in float32.
"""

import itertools
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cpsample_fast.ops import _ext

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    EXT = _ext.get_ext()

needs_ext = pytest.mark.skipif(EXT is None, reason="cpsample_fast._C not built (make build)")

MASK = 0xFFFFFFFF
ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 3, 5, 7)  # odd batch and sample sizes
PREDICTION_TYPES = (0, 1, 2)  # epsilon, v_prediction, sample


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def numpy_philox(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 on uint64 numpy arrays holding uint32 words (Salmon et al. 2011)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & np.uint64(MASK) for c in (c0, c1, c2, c3))
    k0 = np.uint64(seed & MASK)
    k1 = np.uint64((seed >> 32) & MASK)
    for _ in range(10):
        p_b = np.uint64(0xCD9E8D57) * c2  # < 2**64: exact in uint64
        p_a = np.uint64(0xD2511F53) * c0
        c0, c1, c2, c3 = (
            (p_b >> np.uint64(32)) ^ c1 ^ k0,
            p_b & np.uint64(MASK),
            (p_a >> np.uint64(32)) ^ c3 ^ k1,
            p_a & np.uint64(MASK),
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(MASK)
        k1 = (k1 + np.uint64(0xBB67AE85)) & np.uint64(MASK)
    return c0, c1, c2, c3


def numpy_normal(seed: int, sample_index, step: int, stream: int, n: int) -> np.ndarray:
    """Contract normals [B, n] in float64 from the float32 uniforms (Triton's randn recipe)."""
    j = np.arange(n, dtype=np.uint64)[None, :]
    i = np.asarray(sample_index, dtype=np.int64).astype(np.uint64)[:, None]
    w0, w1, _, _ = numpy_philox(j, i, np.uint64(step), np.uint64(stream), seed)

    def uniform(w):
        x = w.astype(np.uint32).view(np.int32)
        x = np.where(x < 0, ~x, x)
        return x.astype(np.float32) * np.float32(4.6566127342e-10)

    u1 = np.maximum(np.float32(1e-7), uniform(w0))
    th = np.float32(6.283185307179586) * uniform(w1)  # the float32 product, as in the kernels
    return np.sqrt(-2.0 * np.log(u1.astype(np.float64))) * np.cos(th.astype(np.float64))


def formula(x, o, g, z, coefs, prediction_type: int, clip: bool, dtype):
    """docs/CONTRACTS.md "The fused update", evaluated in `dtype` in the contract's order."""
    x, o = x.to(dtype), o.to(dtype)
    sa, s1, sp, d, sigma, c = (v.to(dtype) for v in coefs)
    if prediction_type == 0:
        eps, x0 = o, (x - s1 * o) / sa
    elif prediction_type == 2:
        x0, eps = o, (x - sa * o) / s1
    else:
        x0, eps = sa * x - s1 * o, sa * o + s1 * x
    if clip:
        x0 = x0.clamp(-c, c)
    if g is not None:  # guidance after the clip
        eps_hat = eps + g.to(dtype)
        x0_hat = x0 - (s1 / sa) * g.to(dtype)
    else:
        eps_hat, x0_hat = eps, x0
    out = sp * x0_hat + d * eps_hat
    if z is not None:
        out = out + sigma * z.to(dtype)
    return out


def ddim_coefs(abar_t: float, abar_prev: float, eta: float, clip_range: float = 1.0):
    """float32 [6] (sa, s1, sp, d, sigma, clip) for one DDIM step (docs/ALGORITHM.md §3 step 7)."""
    sigma = eta * ((1 - abar_prev) / (1 - abar_t)) ** 0.5 * (1 - abar_t / abar_prev) ** 0.5
    values = [abar_t**0.5, (1 - abar_t) ** 0.5, abar_prev**0.5]
    values += [(1 - abar_prev - sigma**2) ** 0.5, sigma, clip_range]
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error normalised by the reference's max magnitude."""
    return (
        (a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)
    ).item()


# ---------------------------------------------------------------------------------------------
# Philox and normals
# ---------------------------------------------------------------------------------------------

# Random123 kat_vectors, philox4x32 10 rounds: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK, MASK, MASK, MASK), (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@needs_ext
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    seed = key[0] | (key[1] << 32)
    got = EXT.philox4x32_10(torch.tensor([counter], dtype=torch.int64), seed)[0].tolist()
    ref = [int(w[()]) for w in numpy_philox(*counter, seed)]
    print("C++", [hex(w) for w in got], "expected", [hex(w) for w in expected])
    assert tuple(ref) == expected  # the test's own Philox is right
    assert tuple(got) == expected


@needs_ext
def test_philox_words_match_python():
    gen = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (257, 4), generator=gen, dtype=torch.int64)
    for seed in (0, 1, 2**32 + 7, 2**64 - 1, -5):
        got = EXT.philox4x32_10(counters, seed).numpy().astype(np.uint64)
        ref = np.stack(numpy_philox(*counters.numpy().T, seed & (2**64 - 1)), axis=1)
        mismatches = int((got != ref).sum())
        print(f"seed {seed}: {mismatches} mismatching words of {got.size}")
        assert mismatches == 0


@needs_ext
@pytest.mark.parametrize("step,stream", [(0, 0), (7, 0), (0, 1), (3, 1)])
def test_philox_normal_matches_python(step, stream):
    seed, n = 1234567, 3 * 5 * 7
    index = torch.tensor([0, 5, 2**32 + 3], dtype=torch.int64)  # c1 wraps modulo 2**32
    got = EXT.philox_normal(seed, index, step, stream, n)
    ref = torch.from_numpy(numpy_normal(seed, index.numpy(), step, stream, n))
    err = (got.double() - ref).abs().max().item()
    print(f"C++ normals vs float64 Box-Muller: max abs err {err:.3g}")
    assert got.shape == (3, n) and got.dtype == torch.float32
    # float32 logf/sqrtf/cosf: a few ulp of values of magnitude <= 5.7.
    assert err < 2e-6
    # c1 is the low word of the sample index: 2**32 + 3 draws what 3 draws.
    assert torch.equal(got[2], EXT.philox_normal(seed, torch.tensor([3]), step, stream, n)[0])


@needs_ext
def test_philox_normal_matches_torch_noise():
    from cpsample_fast import noise

    seed, index = 99, torch.tensor([4, 0, 11], dtype=torch.int64)
    for step, stream in ((0, 1), (5, 0)):
        ref = noise.philox_normal(seed, index, step, stream, (3, 5, 7)).reshape(3, -1)
        got = EXT.philox_normal(seed, index, step, stream, 105)
        err = (got - ref).abs().max().item()
        exact = (got == ref).float().mean().item()
        print(f"step {step} stream {stream}: max abs err {err:.3g}, bit-exact {exact:.1%}")
        # Same Philox words; libm and torch's vectorised log/cos may differ by an ulp.
        assert err < 2e-6


@needs_ext
def test_normals_are_standard():
    z = EXT.philox_normal(0, torch.arange(4), 0, 0, 25_000).double()
    mean, std = z.mean().item(), z.std().item()
    print(f"mean {mean:.4f} std {std:.4f} (n = {z.numel()})")
    assert abs(mean) < 0.02 and abs(std - 1) < 0.02  # ~6 standard errors at n = 1e5


# ---------------------------------------------------------------------------------------------
# The fused update
# ---------------------------------------------------------------------------------------------


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen)
    o = torch.randn(SHAPE, generator=gen)
    g = 0.3 * torch.randn(SHAPE, generator=gen)
    z = torch.randn(SHAPE, generator=gen)
    return x, o, g, z


@needs_ext
@pytest.mark.parametrize("abar_t,abar_prev,eta", [(0.3, 0.5, 0.7), (0.01, 0.03, 1.0)])
def test_guided_update_matches_formula(abar_t, abar_prev, eta):
    x, o, g, z_explicit = _inputs()
    coefs = ddim_coefs(abar_t, abar_prev, eta)
    seed, step, offset = 2**40 + 17, 6, 5
    rng = torch.tensor([seed, step, offset], dtype=torch.int64)
    index = torch.arange(offset, offset + SHAPE[0])
    z_drawn = EXT.philox_normal(seed, index, step, 0, x[0].numel()).reshape(SHAPE)
    worst = {"vs f32": 0.0, "vs f64": 0.0}
    for p, clip, use_g, noise_mode in itertools.product(
        PREDICTION_TYPES, (False, True), (False, True), ("explicit", "drawn", "none")
    ):
        guidance = g if use_g else None
        noise = z_explicit if noise_mode == "explicit" else None
        z = {"explicit": z_explicit, "drawn": z_drawn, "none": None}[noise_mode]
        out = EXT.guided_update(x, o, guidance, noise, coefs, rng, p, clip, noise_mode == "drawn")
        ref64 = formula(x, o, guidance, z, coefs, p, clip, torch.float64)
        ref32 = formula(x, o, guidance, z, coefs, p, clip, torch.float32)
        err32, err64, base = rel_err(out, ref32), rel_err(out, ref64), rel_err(ref32, ref64)
        worst["vs f32"] = max(worst["vs f32"], err32)
        worst["vs f64"] = max(worst["vs f64"], err64)
        case = f"p={p} clip={clip} g={use_g} noise={noise_mode}"
        assert out.shape == SHAPE and out.dtype == torch.float32, case
        assert err32 < 1e-6, f"{case}: {err32:.3g} vs float32 formula"
        # flash-attention's rule: no worse than twice the float32 evaluation's own error.
        assert err64 <= 2 * base + 1e-7, f"{case}: {err64:.3g} vs float64 (f32 formula {base:.3g})"
    print(f"abar_t={abar_t}: max normalised error {worst}")


@needs_ext
def test_drawn_noise_equals_explicit_contract_noise():
    x, o, g, _ = _inputs(1)
    coefs = ddim_coefs(0.4, 0.6, 1.0)
    seed, step, offset = 3, 2, 10
    rng = torch.tensor([seed, step, offset])
    n = x[0].numel()
    z = EXT.philox_normal(seed, torch.arange(offset, offset + 3), step, 0, n).reshape(SHAPE)
    drawn = EXT.guided_update(x, o, g, None, coefs, rng, 0, True, True)
    explicit = EXT.guided_update(x, o, g, z, coefs, rng, 0, True, False)
    print("max |drawn - explicit|", (drawn - explicit).abs().max().item())
    assert torch.equal(drawn, explicit)
    # A sample draws the same noise alone as inside a batch (sample index = offset + b).
    alone = EXT.guided_update(
        x[1:2], o[1:2], g[1:2], None, coefs, torch.tensor([seed, step, offset + 1]), 0, True, True
    )
    assert torch.equal(alone, drawn[1:2])
    # The noise term really is there: sigma > 0 and z differs from no noise.
    assert not torch.equal(drawn, EXT.guided_update(x, o, g, None, coefs, rng, 0, True, False))


@needs_ext
def test_thread_count_invariance():
    shape = (3, 4, 61, 67)  # 49,044 elements: above the kernel's one-thread cut-off (32,768)
    gen = torch.Generator().manual_seed(2)
    x, o, g = (torch.randn(shape, generator=gen) for _ in range(3))
    coefs, rng = ddim_coefs(0.2, 0.35, 1.0), torch.tensor([11, 4, 1])
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            update = EXT.guided_update(x, o, g, None, coefs, rng, 1, True, True)
            normals = EXT.philox_normal(11, torch.arange(5), 4, 0, 9_001)
            results.append((update, normals))
    finally:
        torch.set_num_threads(before)
    for update, normals in results[1:]:
        diff = (update - results[0][0]).abs().max().item()
        print("max diff vs 1 thread:", diff)
        assert torch.equal(update, results[0][0])
        assert torch.equal(normals, results[0][1])


@needs_ext
def test_empty_batch():
    x = torch.empty(0, 3, 4)
    out = EXT.guided_update(
        x, x, None, None, ddim_coefs(0.5, 0.6, 0.0), torch.zeros(3).long(), 0, True, True
    )
    assert out.shape == (0, 3, 4)


@needs_ext
def test_bad_inputs_raise_clear_errors():
    x, o, g, z = _inputs()
    coefs, rng = ddim_coefs(0.5, 0.6, 0.0), torch.tensor([0, 0, 0])

    def call(**kw):
        args = dict(x=x, model_out=o, guidance=g, noise=z, coefs=coefs, rng=rng)
        args.update(kw)
        return EXT.guided_update(
            args["x"],
            args["model_out"],
            args["guidance"],
            args["noise"],
            args["coefs"],
            args["rng"],
            kw.get("p", 0),
            True,
            False,
        )

    cases = [
        (TypeError, "x must be float32", dict(x=x.double())),
        (TypeError, "model_out must be float32", dict(model_out=o.half())),
        (ValueError, "guidance must have x's shape", dict(guidance=g[:2])),
        (ValueError, "noise must be contiguous", dict(noise=z.transpose(2, 3).contiguous().mT)),
        (ValueError, "x must have a batch dimension", dict(x=torch.tensor(1.0))),
        (ValueError, "coefs must have shape [6]", dict(coefs=coefs[:5])),
        (TypeError, "rng must be int64", dict(rng=rng.int())),
        (ValueError, "prediction_type must be 0", dict(p=3)),
        (ValueError, "model_out must be on cpu", dict(model_out=o.to("meta"))),
    ]
    for exc, message, kw in cases:
        with pytest.raises(exc, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
            call(**kw)
        print(f"{exc.__name__}: {info.value}")
        assert "Exception raised from" not in str(info.value)  # no C++ backtrace for users
    with pytest.raises(ValueError, match="sample_index must have shape"):
        EXT.philox_normal(0, torch.zeros(2, 2).long(), 0, 0, 4)
    with pytest.raises(ValueError, match="seed must lie in"):
        EXT.philox_normal(2**64, torch.zeros(2).long(), 0, 0, 4)


@needs_ext
def test_build_info():
    info = EXT.build_info()
    print(info)
    assert set(info) >= {"cuda", "openmp", "compiler", "cpu_arch", "torch_version"}
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if torch.version.cuda is None:
        assert info["cuda"] is False  # a CPU-only torch builds the CPU part only


@needs_ext
@pytest.mark.cuda
def test_cuda_kernel_matches_cpu_kernel():
    if not EXT.build_info()["cuda"]:
        x = torch.zeros(1, 4, device="cuda")
        with pytest.raises(RuntimeError, match="built without its CUDA part"):
            EXT.guided_update(
                x,
                x,
                None,
                None,
                torch.zeros(6, device="cuda"),
                torch.zeros(3, dtype=torch.int64, device="cuda"),
                0,
                True,
                True,
            )
        return
    x, o, g, z = _inputs(3)
    coefs, rng = ddim_coefs(0.3, 0.5, 0.8), torch.tensor([5, 2, 7])
    for p, clip, noise, draw in itertools.product(
        PREDICTION_TYPES, (False, True), (z, None), (0, 1)
    ):
        cpu = EXT.guided_update(x, o, g, noise, coefs, rng, p, clip, bool(draw))
        dev = [t.cuda() if t is not None else None for t in (x, o, g, noise, coefs, rng)]
        gpu = EXT.guided_update(*dev, p, clip, bool(draw)).cpu()
        err = rel_err(gpu, cpu)
        print(f"p={p} clip={clip} noise={noise is not None} draw={draw}: {err:.3g}")
        # --fmad=false: same float32 rounding; CUDA's logf/cosf may differ by an ulp from libm.
        assert err < 1e-6


# ---------------------------------------------------------------------------------------------
# Loader and build checks
# ---------------------------------------------------------------------------------------------


def test_missing_extension_warns_once_and_returns_none(monkeypatch):
    def fail(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext.importlib, "import_module", fail)
    with pytest.warns(RuntimeWarning, match=r"cpsample_fast\._C not built; using torch fallbacks"):
        assert _ext.get_ext() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        assert _ext.get_ext() is None
        assert _ext.has_cuda_kernels() is False


NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if Path(p).is_file()), None
)


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_kernels_compile_without_torch(tmp_path):
    # What `make check-cuda` runs: the kernels need only csrc/ and the CUDA toolkit (~4 s).
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-O3", f"-I{ROOT / 'csrc'}", "-c", str(source)]
        result = subprocess.run(
            [*cmd, "-o", str(tmp_path / (source.name + ".o"))], capture_output=True, text=True
        )
        print(" ".join(cmd), result.returncode, result.stderr[-2000:])
        assert result.returncode == 0, result.stderr
