"""The tables of a noise schedule, one small function each (docs/ALGORITHM.md §1): betas, DDIM
inference timesteps and the per-step DDIM coefficients, from a ``ScheduleConfig``.

Each keeps the float32 operation order of diffusers' ``DDIMScheduler`` (``__init__``,
``set_timesteps``, ``_get_variance``, ``step``; diffusers 0.42) on purpose, so every coefficient
rounds as diffusers rounds it; ``tests/test_schedule.py`` checks the results bit for bit over a
sweep of configs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .schedule_config import ScheduleConfig

COEFFICIENT_KEYS = ("sqrt_alpha", "sqrt_one_minus_alpha", "sqrt_alpha_prev", "dir_coef", "sigma")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Glide's ``squaredcos_cap_v2`` betas, as diffusers' ``betas_for_alpha_bar`` (cosine).

    Computed in Python doubles and rounded to float32 once at the end, as diffusers does.
    """

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """float32 ``[T]`` betas of ``config``; ``ValueError`` unless every beta lies in (0, 1).

    β = 0 makes √(1-ᾱ_t) = 0 at t = 0 (0/0 in the variance), β = 1 makes ᾱ = 0 (division by
    √ᾱ): both break the DDIM step, so they are refused up front.
    """
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        # Latent-diffusion schedule: linear in sqrt(beta), squared in float32 as diffusers.
        start, end = config.beta_start**0.5, config.beta_end**0.5
        betas = torch.linspace(start, end, T, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(T)
    ok = torch.isfinite(betas) & (betas > 0) & (betas < 1)
    if not ok.all():
        k = int(torch.nonzero(~ok)[0])
        origin = (
            "trained_betas"
            if config.trained_betas is not None
            else f"beta_start/beta_end with beta_schedule={config.beta_schedule!r}"
        )
        raise ValueError(f"{origin} must give betas in (0, 1), got betas[{k}] = {betas[k]}")
    return betas


def inference_timesteps(config: ScheduleConfig, n: int) -> torch.Tensor:
    """Descending int64 ``[n]`` timesteps, as ``DDIMScheduler.set_timesteps(n).timesteps``
    (``n`` already checked to lie in ``1..T``).

    For ``trailing`` spacing diffusers 0.42 builds the grid with a float
    ``np.arange(T, 0, -T/n)``, which for some ``n`` (158 values at T = 1000, e.g. 61, 103) emits
    one extra timestep ``-1``; the same grid is built here and its first ``n`` entries kept,
    which equal diffusers' first ``n``.
    """
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif config.timestep_spacing == "leading":
        step_ratio = T // n
        ts = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
        ts += config.steps_offset
        if ts[0] > T - 1:
            raise ValueError(
                f"steps_offset={config.steps_offset} with num_inference_steps={n} gives "
                f"timestep {int(ts[0])} > num_train_timesteps - 1 = {T - 1}"
            )
    else:  # trailing
        step_ratio = T / n
        ts = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64)[:n]
        ts -= 1
    return torch.from_numpy(ts)


def ddim_coefficients(
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    eta: float,
) -> dict[str, torch.Tensor]:
    """The five per-step DDIM coefficients (``COEFFICIENT_KEYS``, float32 ``[n]``) at timesteps
    ``t`` stepping to ``t_prev`` (docs/ALGORITHM.md §1 and §3 step 7).

    The elementwise float32 ops are diffusers' own (``x ** 0.5`` is ``sqrt`` and ``x ** 2`` is
    ``x * x`` in torch), applied to a vector instead of one 0-dim tensor per step; IEEE rounding
    makes both bit-identical. ``ValueError`` when ``eta > 1`` makes ``1 - ᾱ' - σ² < 0``.
    """
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = torch.where(
        t_prev >= 0, alphas_cumprod[t_prev.clamp_min(0)], final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    # _get_variance
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    dir_sq = 1 - alpha_prod_t_prev - std_dev_t**2
    if (dir_sq < 0).any():
        if eta > 1:
            k = int(torch.nonzero(dir_sq < 0)[0])
            raise ValueError(
                f"eta={eta} is too large: 1 - ᾱ' - σ² < 0 at loop step {k} "
                f"(t={int(t[k])}); DDIM needs eta <= 1 there"
            )
        # η <= 1 keeps 1 - ᾱ' - σ² >= 0 in exact arithmetic; a rounding-level negative is 0
        # (diffusers would return NaN). Nonnegative values pass through unchanged.
        dir_sq = dir_sq.clamp_min(0)
    return {
        "sqrt_alpha": alpha_prod_t ** (0.5),
        "sqrt_one_minus_alpha": beta_prod_t ** (0.5),
        "sqrt_alpha_prev": alpha_prod_t_prev ** (0.5),
        "dir_coef": dir_sq ** (0.5),
        "sigma": std_dev_t,
    }


def ddim_coef_table(schedule, num_inference_steps: int, eta: float) -> torch.Tensor:
    """float32 ``[n, 6]`` rows ``(√ᾱ_t, √(1-ᾱ_t), √ᾱ', √(1-ᾱ'-σ²), σ, clip range)``: the
    ``coefs`` argument of ``cpsample::guided_update`` for each loop step (docs/CONTRACTS.md
    "The fused update")."""
    c = schedule.step_coefficients(num_inference_steps, eta)
    clip = torch.full(
        (num_inference_steps,), float(schedule.clip_sample_range), dtype=torch.float32
    )
    return torch.stack([c[key] for key in COEFFICIENT_KEYS] + [clip], dim=1).float().contiguous()
