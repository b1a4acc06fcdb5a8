"""Counter-based noise (docs/ALGORITHM.md §4): bit-exact vs Triton and Random123, statistically
sound."""

import math

import pytest
import torch

from cpsample_fast import noise

try:  # the Triton cross-checks skip without it (and fail in CI, tests/conftest.py); the
    # known-answer, statistics and torch tests below never need it
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

needs_triton = pytest.mark.skipif(triton is None, reason="needs Triton")

MASK = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def python_philox(seed: int, ctr: tuple[int, int, int, int], rounds: int = 10) -> list[int]:
    """Philox4x32 in plain Python integers (the textbook form, Salmon et al. 2011)."""
    c0, c1, c2, c3 = (c & MASK for c in ctr)
    k0, k1 = seed & MASK, (seed >> 32) & MASK
    for _ in range(rounds):
        p_b = 0xCD9E8D57 * c2
        p_a = 0xD2511F53 * c0
        c0, c1, c2, c3 = (p_b >> 32) ^ c1 ^ k0, p_b & MASK, (p_a >> 32) ^ c3 ^ k1, p_a & MASK
        k0 = (k0 + 0x9E3779B9) & MASK
        k1 = (k1 + 0xBB67AE85) & MASK
    return [c0, c1, c2, c3]


def _i32(values):
    """uint32 Python ints → int32 tensor with the same bits."""
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


def _i64_bits(value: int) -> int:
    """uint64 Python int → int64 Python int with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _philox_probe_kernel(out_ptr, ctr_ptr, seed, N: tl.constexpr):
    o = tl.arange(0, N)
    c0 = tl.load(ctr_ptr + 4 * o)
    c1 = tl.load(ctr_ptr + 4 * o + 1)
    c2 = tl.load(ctr_ptr + 4 * o + 2)
    c3 = tl.load(ctr_ptr + 4 * o + 3)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    tl.store(out_ptr + 4 * o, w0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * o + 1, w1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * o + 2, w2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 4 * o + 3, w3.to(tl.int32, bitcast=True))
    # The normal of the same counter, by Triton's own randn recipe.
    u1 = tl.uint_to_uniform_float(w0)
    u2 = tl.uint_to_uniform_float(w1)
    n1, _ = tl.pair_uniform_to_normal(u1, u2)
    tl.store(out_ptr + 4 * N + o, n1.to(tl.int32, bitcast=True))


@_jit
def _randn_probe_kernel(out_ptr, offset_ptr, seed, N: tl.constexpr):
    o = tl.arange(0, N)
    offset = tl.load(offset_ptr + o)  # int64
    tl.store(out_ptr + o, tl.randn(seed, offset))


def triton_philox(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's philox words (as uint32 in int64) and normals for int32 counters ``[N, 4]``."""
    n = counters.shape[0]
    padded = triton.next_power_of_2(n)  # tl.arange needs a power of two
    ctr = torch.zeros(padded, 4, dtype=torch.int32)
    ctr[:n] = counters
    out = torch.empty(5 * padded, dtype=torch.int32)
    _philox_probe_kernel[(1,)](out, ctr, _i64_bits(seed), N=padded)
    words = out[: 4 * n].view(n, 4).to(torch.int64) & MASK
    normals = out[4 * padded : 4 * padded + n].view(torch.float32)
    return words, normals


RANDOM123_KAT = [
    # (counter, key (k0, k1), expected) from Random123's kat_vectors, philox4x32_10.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


# ---------------------------------------------------------------------------------------------
# Bit-exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctr,key,expected", RANDOM123_KAT)
def test_random123_known_answers(ctr, key, expected):
    # Word order: Random123 ctr[0..3] = (c0..c3), key[0] = low seed word, key[1] = high word;
    # Triton (and so the contract) uses the same order, checked here for both.
    seed = key[0] | (key[1] << 32)
    words = noise.philox4x32(seed, *(torch.tensor([c]) for c in ctr))
    got = tuple(int(w) for w in words)
    assert got == expected, [hex(g) for g in got]
    assert python_philox(seed, ctr) == list(expected)


@needs_triton
@pytest.mark.parametrize("ctr,key,expected", RANDOM123_KAT)
def test_random123_known_answers_triton(ctr, key, expected):
    seed = key[0] | (key[1] << 32)
    tri, _ = triton_philox(seed, _i32(ctr)[None, :])
    assert tuple(tri[0].tolist()) == expected


def test_philox_matches_python_on_random_counters():
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**32, (64, 4), generator=gen, dtype=torch.int64)
    for seed in (0, 2**32 + 5, 2**64 - 1):
        words = torch.stack(noise.philox4x32(seed, *counters.unbind(1)), dim=1)  # [64, 4]
        py = torch.tensor([python_philox(seed, tuple(c)) for c in counters.tolist()])
        assert int((words != py).sum()) == 0, seed


@needs_triton
def test_philox_matches_python_and_triton_on_random_counters():
    gen = torch.Generator().manual_seed(0)
    n = 256
    counters = torch.randint(0, 2**32, (n, 4), generator=gen, dtype=torch.int64)
    counters[:4] = torch.tensor([[0, 0, 0, 0], [MASK] * 4, [1, 2, 3, 4], [2**31, 0, 2**31 - 1, 7]])
    for seed in (0, 1, 2**32 + 5, 2**64 - 1, 0x123456789ABCDEF):
        words = torch.stack(noise.philox4x32(seed, *counters.unbind(1)), dim=1)  # [n, 4]
        py = torch.tensor([python_philox(seed, tuple(c)) for c in counters.tolist()])
        tri, _ = triton_philox(seed, (counters - (counters >= 2**31) * 2**32).to(torch.int32))
        mismatches_py = int((words != py).sum())
        mismatches_tri = int((words != tri).sum())
        print(f"seed={seed:#x}: mismatches vs python {mismatches_py}, vs triton {mismatches_tri}")
        assert mismatches_py == 0 and mismatches_tri == 0
        assert int(words.min()) >= 0 and int(words.max()) <= MASK


def test_seed_as_tensor_and_int32_counters_agree_with_int_seed():
    seed = 0x0123456789ABCDEF
    c = torch.arange(-3, 5, dtype=torch.int32)  # negative int32 = word with the top bit set
    a = noise.philox4x32(seed, c, 7, 8, 9)
    b = noise.philox4x32(torch.tensor(seed), c.to(torch.int64) & MASK, 7, 8, 9)
    for wa, wb in zip(a, b):
        assert torch.equal(wa, wb)
    # A negative int64 seed tensor means the same 64 bits as the uint64 Python int.
    neg = _i64_bits(2**64 - 3)
    for wa, wb in zip(noise.philox4x32(torch.tensor(neg), c, 0, 0, 0),
                      noise.philox4x32(2**64 - 3, c, 0, 0, 0)):  # fmt: skip
        assert torch.equal(wa, wb)


@needs_triton
def test_normals_match_triton_randn():
    # With step = stream = 0 the contract is exactly tl.randn(seed, (i << 32) | j).
    seed, batch, numel = 1234, 3, 35
    idx = torch.tensor([0, 5, 2**32 - 1])
    ours = noise.philox_normal(seed, idx, 0, 0, (5, 7)).reshape(batch, numel)
    offsets = (idx[:, None] << 32) | torch.arange(numel)[None, :]
    out = torch.empty(128, dtype=torch.float32)
    flat = torch.zeros(128, dtype=torch.int64)
    flat[: batch * numel] = offsets.reshape(-1)
    _randn_probe_kernel[(1,)](out, flat, seed, N=128)
    tri = out[: batch * numel].view(batch, numel)
    err = (ours - tri).abs().max().item()
    print(f"max |philox_normal - tl.randn| = {err:.3e}")
    assert err <= 4 * torch.finfo(torch.float32).eps * tri.abs().max().item()


@needs_triton
@pytest.mark.parametrize("compiled", [False, True])
def test_normals_match_triton_recipe_all_counter_words(compiled):
    seed = 99
    counters = torch.tensor(
        [[j, i, k, s] for j in range(8) for i in (0, 3) for k in (0, 1, 49) for s in (0, 1)]
    )
    _, tri = triton_philox(seed, counters.to(torch.int32))

    def draw(j, i, k, s):
        w0, w1, _, _ = noise.philox4x32(seed, j, i, k, s)
        return noise.box_muller(noise.uint32_to_uniform(w0), noise.uint32_to_uniform(w1))

    fn = torch.compile(draw, fullgraph=True, dynamic=False) if compiled else draw
    ours = fn(*counters.unbind(1))
    err = (ours - tri).abs().max().item()
    print(f"compiled={compiled}: max |ours - triton recipe| = {err:.3e}")
    assert err <= 4 * torch.finfo(torch.float32).eps * tri.abs().max().item()
    # philox_normal uses the same counters: (j, i, k, stream).
    pn = noise.philox_normal(seed, torch.tensor([3]), 49, 1, (8,))[0]
    sel = (counters[:, 1] == 3) & (counters[:, 2] == 49) & (counters[:, 3] == 1)
    assert torch.allclose(pn, tri[sel], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def test_moments_and_ks():
    n_samples, numel = 1000, 1000  # 1e6 draws
    z = noise.step_noise(7, 3, (n_samples, numel)).double().reshape(-1)
    n = z.numel()
    mean = z.mean().item()
    var = z.var().item()
    c = z - mean
    skew = (c**3).mean().item() / var**1.5
    kurt = (c**4).mean().item() / var**2 - 3.0
    print(f"n={n}: mean {mean:.2e} var {var:.5f} skew {skew:.2e} excess kurtosis {kurt:.2e}")
    # 5 standard errors of each estimator under N(0, 1).
    assert abs(mean) < 5 / math.sqrt(n)
    assert abs(var - 1) < 5 * math.sqrt(2 / n)
    assert abs(skew) < 5 * math.sqrt(6 / n)
    assert abs(kurt) < 5 * math.sqrt(24 / n)
    assert torch.isfinite(z).all()
    scipy_stats = pytest.importorskip("scipy.stats")
    ks = scipy_stats.kstest(z[:200_000].numpy(), "norm")
    print(f"KS statistic {ks.statistic:.2e}, p = {ks.pvalue:.3f}")
    assert ks.pvalue > 1e-4


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_streams_seeds_steps_samples_uncorrelated():
    shape = (3, 4, 32, 32)
    n = math.prod(shape)
    base = noise.step_noise(1, 0, shape)
    others = {
        "seed": noise.step_noise(2, 0, shape),
        "seed_hi_word": noise.step_noise(1 + 2**32, 0, shape),
        "step": noise.step_noise(1, 1, shape),
        "stream": noise.initial_noise(1, shape),
        "sample": noise.step_noise(1, 0, shape, sample_offset=1),
    }
    bound = 5 / math.sqrt(n)
    for name, other in others.items():
        r = _corr(base, other)
        print(f"corr(base, different {name}) = {r:+.4f} (bound {bound:.4f})")
        assert abs(r) < bound
        assert not torch.equal(base, other)
    # Neighbouring elements and samples inside one draw are uncorrelated too.
    flat = base.reshape(3, -1)
    assert abs(_corr(flat[:, 1:], flat[:, :-1])) < 5 / math.sqrt(flat[:, 1:].numel())
    assert abs(_corr(flat[0], flat[1])) < 5 / math.sqrt(flat.shape[1])


def test_seed_reproducible_and_tensor_arguments_equal_ints():
    shape = (3, 2, 5, 7)
    a = noise.step_noise(11, 4, shape, sample_offset=2)
    b = noise.step_noise(11, 4, shape, sample_offset=2)
    c = noise.step_noise(torch.tensor(11), torch.tensor(4), shape, torch.tensor(2))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == shape
    d = noise.initial_noise(torch.tensor(11), shape, torch.tensor(2))
    assert torch.equal(d, noise.initial_noise(11, shape, 2))


def test_batch_invariance():
    shape = (7, 3, 5, 7)
    batch = noise.step_noise(5, 2, shape, sample_offset=10)
    for b in (0, 3, 6):
        alone = noise.step_noise(5, 2, (1, *shape[1:]), sample_offset=10 + b)
        assert torch.equal(alone[0], batch[b]), b
    # Two "ranks" each drawing half of the global batch.
    first = noise.initial_noise(5, (4, *shape[1:]), 10)
    second = noise.initial_noise(5, (3, *shape[1:]), 14)
    assert torch.equal(torch.cat([first, second]), noise.initial_noise(5, shape, 10))


def test_compiled_no_recompile_per_step():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    shape = (3, 2, 4, 4)

    def draw(seed, step, offset):
        return noise.step_noise(seed, step, shape, offset) * 2.0

    fn = torch.compile(draw, backend=counter, fullgraph=True)
    seed, offset = torch.tensor(3), torch.tensor(1)
    for k in range(4):
        out = fn(seed, torch.tensor(k), offset)
        assert torch.equal(out, draw(seed, torch.tensor(k), offset))
    print(f"frames compiled over 4 steps: {counter.frame_count}")
    assert counter.frame_count == 1


def test_bad_inputs():
    idx = torch.arange(2)
    with pytest.raises(TypeError, match="seed"):
        noise.philox_normal(1.5, idx, 0, 0, (3,))
    with pytest.raises(TypeError, match="seed"):
        noise.philox_normal(torch.tensor([1, 2]), idx, 0, 0, (3,))
    with pytest.raises(ValueError, match="seed"):
        noise.philox_normal(2**64, idx, 0, 0, (3,))
    with pytest.raises(ValueError, match="step"):
        noise.philox_normal(0, idx, -1, 0, (3,))
    with pytest.raises(TypeError, match="step"):
        noise.philox_normal(0, idx, torch.tensor(1.0), 0, (3,))
    with pytest.raises(TypeError, match="sample_index"):
        noise.philox_normal(0, idx.float(), 0, 0, (3,))
    with pytest.raises(TypeError, match="sample_index"):
        noise.philox_normal(0, idx[None], 0, 0, (3,))
    with pytest.raises(ValueError, match="sample_offset"):
        noise.step_noise(0, 0, (2, 3), sample_offset=-1)
    with pytest.raises(ValueError, match="shape"):
        noise.step_noise(0, 0, ())
    with pytest.raises(TypeError, match="c1"):
        noise.philox4x32(0, torch.arange(2), 1.0, 0, 0)
    with pytest.raises(TypeError, match="counter"):
        noise.philox4x32(0, 1, 2, 3, 4)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    shape = (3, 3, 5, 7)
    cpu = noise.step_noise(21, 6, shape, 4)
    gpu = noise.step_noise(torch.tensor(21, device="cuda"), 6, shape, 4, device="cuda")
    err = (cpu - gpu.cpu()).abs().max().item()
    print(f"max |cpu - cuda| = {err:.3e}")
    assert err < 1e-5
    w_cpu = noise.philox4x32(21, torch.arange(100), 1, 2, 3)
    w_gpu = noise.philox4x32(21, torch.arange(100, device="cuda"), 1, 2, 3)
    # 0-dim CPU scalars (seed, step) mixed with CUDA counters, in any position.
    w_mix = noise.philox4x32(torch.tensor(21), torch.tensor(0), 1, torch.tensor(2), 3)
    w_mix_gpu = noise.philox4x32(torch.tensor(21), torch.tensor(0), torch.ones(1, device="cuda"
                                 ).long(), torch.tensor(2), 3)  # fmt: skip
    assert all(w.device.type == "cuda" for w in w_mix_gpu)
    assert all(torch.equal(a, b.cpu().reshape(())) for a, b in zip(w_mix, w_mix_gpu))
    for a, b in zip(w_cpu, w_gpu):
        assert torch.equal(a, b.cpu())
