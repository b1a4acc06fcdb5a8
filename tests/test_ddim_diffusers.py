"""Unguided DDIM against diffusers' DDIMScheduler loop on a tiny random UNet (docs/ALGORITHM.md §1).

Three loops are compared with diffusers' ``scheduler.step`` loop over a sweep of configs
(prediction types, clipping, spacings, offsets, η = 0 and η > 0 with explicit per-step noise):

- a minimal loop written here from ``NoiseSchedule.step_coefficients`` and the per-element
  formula of docs/CONTRACTS.md ("The fused update"): validates the schedule; expected bit-exact;
- ``reference_sample(..., protector=None)``;
- ``CPSampler(..., protector=None).sample`` for each backend that runs here.

docs/ALGORITHM.md §1 asks for relative error < 1e-5 in float32; errors are printed per config.
"""

from __future__ import annotations

import pytest
import torch

from cpsample_fast.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

B, H, W = 3, 8, 8  # odd batch: catches code that assumes even or power-of-two sizes
TOL = 1e-5  # docs/ALGORITHM.md §1, float32

# (id, scheduler config, channels, num_inference_steps, eta)
CONFIGS = [
    ("eps-clip-leading-eta0", {}, 3, 10, 0.0),
    (
        "eps-noclip-trailing-cosine-eta0",
        {
            "beta_schedule": "squaredcos_cap_v2",
            "clip_sample": False,
            "timestep_spacing": "trailing",
        },
        1,
        10,
        0.0,
    ),
    (
        "v-clip-linspace-scaled-eta0.5",
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "prediction_type": "v_prediction",
            "timestep_spacing": "linspace",
        },
        3,
        10,
        0.5,
    ),
    (
        "v-noclip-leading-eta0",
        {"prediction_type": "v_prediction", "clip_sample": False},
        1,
        10,
        0.0,
    ),
    (
        "sample-clip-leading-offset1-noalpha1-eta1",
        {"prediction_type": "sample", "steps_offset": 1, "set_alpha_to_one": False},
        3,
        10,
        1.0,
    ),
    (
        "sample-noclip-linspace-eta0",
        {"prediction_type": "sample", "clip_sample": False, "timestep_spacing": "linspace"},
        2,
        10,
        0.0,
    ),
    (
        "eps-noclip-trailing-eta1",
        {"clip_sample": False, "timestep_spacing": "trailing"},
        3,
        10,
        1.0,
    ),
    (
        "eps-clip0.5-trailing-odd7-eta0.3",
        {"clip_sample_range": 0.5, "timestep_spacing": "trailing", "steps_offset": 1},
        1,
        7,
        0.3,
    ),
]
IDS = [c[0] for c in CONFIGS]

_UNETS: dict[int, torch.nn.Module] = {}


def _unet(channels: int) -> torch.nn.Module:
    """A tiny seeded ``UNet2DModel`` (165k parameters, ~6 ms per batch-3 call on one core)."""
    if channels not in _UNETS:
        torch.manual_seed(1234 + channels)
        _UNETS[channels] = diffusers.UNet2DModel(
            sample_size=H,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        ).eval()
    return _UNETS[channels]


def _eps_model(channels: int):
    unet = _unet(channels)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # [B,C,H,W], int64 [B]
        return unet(x, t).sample

    return eps_model


def _inputs(channels: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7 * channels + n)
    noise = torch.randn(B, channels, H, W, generator=g)  # x_T
    step_noise = torch.randn(n, B, channels, H, W, generator=g)  # z of each loop step
    return noise, step_noise


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def _diffusers_loop(config, channels, n, eta, noise, step_noise) -> torch.Tensor:
    """The canonical diffusers loop: ``for t in timesteps: x = step(unet(x, t), t, x)``."""
    sched = diffusers.DDIMScheduler(**config)
    sched.set_timesteps(n)
    assert len(sched.timesteps) == n
    unet = _unet(channels)
    x = noise.clone()
    for k, t in enumerate(sched.timesteps):
        out = unet(x, t).sample
        z = step_noise[k] if eta > 0 else None
        x = sched.step(out, t, x, eta=eta, variance_noise=z).prev_sample
    return x


def _fused_update(x, o, z, c, k, schedule: NoiseSchedule) -> torch.Tensor:
    """docs/CONTRACTS.md "The fused update" with no guidance (g = 0) in float32."""
    sa, s1 = c["sqrt_alpha"][k], c["sqrt_one_minus_alpha"][k]
    sp, d, sigma = c["sqrt_alpha_prev"][k], c["dir_coef"][k], c["sigma"][k]
    if schedule.prediction_type == "epsilon":
        eps, x0 = o, (x - s1 * o) / sa
    elif schedule.prediction_type == "sample":
        x0, eps = o, (x - sa * o) / s1
    else:  # v_prediction
        x0, eps = sa * x - s1 * o, sa * o + s1 * x
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    x_prev = sp * x0 + d * eps
    if z is not None:
        x_prev = x_prev + sigma * z
    return x_prev


@torch.no_grad()
def _own_loop(schedule, eps_model, n, eta, noise, step_noise) -> torch.Tensor:
    c = schedule.step_coefficients(n, eta)
    x = noise.clone()
    for k, t in enumerate(schedule.timesteps(n)):
        o = eps_model(x, t.repeat(x.shape[0]))
        x = _fused_update(x, o, step_noise[k] if eta > 0 else None, c, k, schedule)
    return x


@pytest.mark.parametrize("name, config, channels, n, eta", CONFIGS, ids=IDS)
def test_single_steps_bit_exact(name, config, channels, n, eta):
    """Each step of the contract formula equals ``DDIMScheduler.step`` on the same inputs."""
    schedule = NoiseSchedule.from_diffusers(config)
    sched = diffusers.DDIMScheduler(**config)
    sched.set_timesteps(n)
    c = schedule.step_coefficients(n, eta)
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for k, t in enumerate(sched.timesteps):
        x = torch.randn(B, channels, 5, 7, generator=g) * 2  # odd spatial sizes
        o = torch.randn(B, channels, 5, 7, generator=g)
        z = torch.randn(B, channels, 5, 7, generator=g) if eta > 0 else None
        want = sched.step(o, t, x, eta=eta, variance_noise=z).prev_sample
        got = _fused_update(x, o, z, c, k, schedule)
        worst = max(worst, (got - want).abs().max().item())
        assert torch.equal(got, want), (name, k, int(t))
    print(f"{name}: single-step max |Δ| = {worst:.3e}")


@pytest.mark.parametrize("name, config, channels, n, eta", CONFIGS, ids=IDS)
def test_own_loop_matches_diffusers(name, config, channels, n, eta):
    noise, step_noise = _inputs(channels, n)
    want = _diffusers_loop(config, channels, n, eta, noise, step_noise)
    schedule = NoiseSchedule.from_diffusers(config)
    got = _own_loop(schedule, _eps_model(channels), n, eta, noise, step_noise)
    err = _rel_err(got, want)
    print(f"{name}: own loop rel err = {err:.3e}")
    assert torch.isfinite(want).all() and want.abs().max() > 0
    assert err < TOL
    # Same arithmetic in the same order: nothing should round differently.
    assert torch.equal(got, want)


@pytest.mark.parametrize("name, config, channels, n, eta", CONFIGS, ids=IDS)
def test_reference_sample_matches_diffusers(name, config, channels, n, eta):
    from cpsample_fast.reference import reference_sample

    noise, step_noise = _inputs(channels, n)
    want = _diffusers_loop(config, channels, n, eta, noise, step_noise)
    schedule = NoiseSchedule.from_diffusers(config)
    with torch.no_grad():
        got = reference_sample(
            _eps_model(channels),
            None,
            schedule,
            tuple(noise.shape),
            num_inference_steps=n,
            eta=eta,
            noise=noise,
            step_noise=step_noise if eta > 0 else None,
        )
    err = _rel_err(got, want)
    print(f"{name}: reference_sample rel err = {err:.3e}")
    assert got.shape == want.shape and got.dtype == torch.float32
    assert err < TOL


BACKENDS = ("auto", "torch", "cpp", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, config, channels, n, eta", CONFIGS, ids=IDS)
def test_cpsampler_matches_diffusers(name, config, channels, n, eta, backend):
    from cpsample_fast import ops
    from cpsample_fast.sampler import CPSampler

    available = ops.available_backends(torch.device("cpu"))
    if backend != "auto" and backend not in available:
        pytest.skip(f"backend {backend!r} is not available here (available: {available})")
    noise, step_noise = _inputs(channels, n)
    want = _diffusers_loop(config, channels, n, eta, noise, step_noise)
    schedule = NoiseSchedule.from_diffusers(config)
    sampler = CPSampler(
        _eps_model(channels), None, schedule, num_inference_steps=n, eta=eta, backend=backend
    )
    got = sampler.sample(
        tuple(noise.shape), noise=noise, step_noise=step_noise if eta > 0 else None
    )
    err = _rel_err(got, want)
    print(f"{name} [{backend}]: CPSampler rel err = {err:.3e}")
    assert got.shape == want.shape and got.dtype == torch.float32
    assert err < TOL
