"""Solver choice and the DPM-Solver++(2M) coefficient tables (diffusers-exact).

``solver="ddim"`` is the DDIM step of docs/ALGORITHM.md §3. ``solver="dpmsolver++"`` is diffusers'
``DPMSolverMultistepScheduler`` with its defaults (``algorithm_type="dpmsolver++"``,
``solver_order=2``, ``solver_type="midpoint"``, ``lower_order_final=True``,
``final_sigmas_type="zero"``), configured from the schedule exactly as
``DPMSolverMultistepScheduler.from_config(ddim_config)`` would be: same betas, prediction type,
``timestep_spacing`` and ``steps_offset``, but DPM-Solver's own timestep grid (``n + 1`` points,
the last dropped) and its σ table.

One DPM-Solver++ step works on the data prediction only (docs/CONTRACTS.md "The multistep
update"): with ``x̂0`` from the model output (and the guidance, as in DDIM:
``x̂0 = x0 − (σ_s/α_s)·G``, then clipped to ±clip_sample_range when the schedule clips),

    x_{t'} = A·x_t − B·x̂0 − C·(R·(x̂0 − x̂0_prev))

with per-step scalars ``A = σ_t/σ_s``, ``B = α_t·(e^{−h} − 1)``, ``C = B/2``, ``R = 1/r0``
(``C = R = 0`` on first-order steps). The scalars are computed here one step at a time as 0-dim
float32 tensors in diffusers' own operation order, so the tables are bit-identical to what
``DPMSolverMultistepScheduler.step`` multiplies with; ``tests/test_dpm.py`` checks the loop against
diffusers. diffusers is not imported here.

``clip_sample=True`` (the schedule's default) clamps the data prediction x̂0 before the solver
uses it; diffusers' DPM-Solver has no such option (its ``thresholding`` is a different rule), so
compare with diffusers at ``clip_sample=False``. Because the solver reads the model only through
x̂0, clipping it is consistent by construction: the guided and the unguided step see the same
clipped x̂0 where the clip cuts the guidance's shift (docs/ALGORITHM.md §3 step 6).
"""

from __future__ import annotations

import numpy as np
import torch

SOLVERS = ("ddim", "dpmsolver++")
# Order of a solver: how many model evaluations one update combines (1 = no state).
SOLVER_ORDER = {"ddim": 1, "dpmsolver++": 2}
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# The columns of the multistep update's `coefs` [7] (one row per step).
DPM_COEF_KEYS = ("alpha_s", "sigma_s", "A", "B", "C", "R", "clip")
NUM_DPM_COEFS = len(DPM_COEF_KEYS)


def check_solver(solver, *, eta: float = 0.0, num_inference_steps: int | None = None) -> str:
    """Validate a solver name and its compatibility with η and the step count.

    Raises:
        ValueError: unknown solver; η > 0 with a deterministic solver; one step with a
            second-order solver.
    """
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver != "ddim":
        if float(eta) != 0.0:
            raise ValueError(
                f"eta={eta} needs a stochastic solver; solver={solver!r} is deterministic "
                "(use eta=0, or solver='ddim' for DDIM with η > 0)"
            )
        if num_inference_steps is not None and int(num_inference_steps) < SOLVER_ORDER[solver]:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is too few for solver={solver!r}, a "
                f"second-order multistep solver: use num_inference_steps >= "
                f"{SOLVER_ORDER[solver]} (or solver='ddim')"
            )
    return solver


def solver_timesteps(schedule, num_inference_steps: int, solver: str = "ddim") -> torch.Tensor:
    """The training timesteps a solver visits, int64 ``[n]`` (what ``CPSampler(...).timesteps``
    holds): for code that plans per-step work, e.g. a tuner counting guided steps of a
    ``guidance_range`` while it searches ``solver`` and ``num_inference_steps``."""
    check_solver(solver, num_inference_steps=num_inference_steps)
    if solver == "ddim":
        return schedule.timesteps(num_inference_steps)
    return dpm_timesteps(schedule, num_inference_steps)


def guided_step_count(schedule, num_inference_steps: int, solver: str = "ddim",
                      guidance_range: tuple[int, int] | None = None) -> int:  # fmt: skip
    """Protector evaluations per image: how many of the solver's timesteps lie in the inclusive
    ``guidance_range`` (all of them without one)."""
    ts = solver_timesteps(schedule, num_inference_steps, solver)
    if guidance_range is None:
        return len(ts)
    return int(((ts >= guidance_range[0]) & (ts <= guidance_range[1])).sum())


def dpm_timesteps(schedule, num_inference_steps: int) -> torch.Tensor:
    """``DPMSolverMultistepScheduler.set_timesteps(n).timesteps`` for this schedule, int64 ``[n]``.

    Raises:
        ValueError: naming ``timestep_spacing`` / ``steps_offset`` when the grid cannot give
            ``n`` distinct timesteps in ``0..T-1`` (diffusers would silently run another number
            of steps, or divide by a zero step size).
    """
    n = schedule._check_steps(num_inference_steps)
    T = int(schedule.num_train_timesteps)
    spacing = schedule.timestep_spacing
    last = T  # lambda_min_clipped = -inf: nothing is clipped
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        step_ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
        ts += schedule.steps_offset
    else:  # trailing
        step_ratio = T / n
        ts = np.arange(last, 0, -step_ratio).round().copy().astype(np.int64)
        ts -= 1
    if len(ts) != n:
        raise ValueError(
            f"schedule timestep_spacing={spacing!r} gives {len(ts)} DPM-Solver timesteps for "
            f"num_inference_steps={n} (diffusers would run {len(ts)} steps); choose another "
            "num_inference_steps or timestep_spacing for solver='dpmsolver++'"
        )
    if ts.max() > T - 1 or ts.min() < 0:
        raise ValueError(
            f"schedule steps_offset={schedule.steps_offset} with timestep_spacing={spacing!r} "
            f"and num_inference_steps={n} gives DPM-Solver timestep {int(ts.max())} outside "
            f"0..{T - 1}"
        )
    if len(np.unique(ts)) != n:
        raise ValueError(
            f"schedule timestep_spacing={spacing!r} gives repeated DPM-Solver timesteps for "
            f"num_inference_steps={n} (a zero step size); use fewer steps for solver='dpmsolver++'"
        )
    return torch.from_numpy(ts)


def dpm_sigmas(schedule, num_inference_steps: int, final_sigmas_type: str = "zero") -> torch.Tensor:
    """diffusers' ``sigmas`` after ``set_timesteps(n)``: float32 ``[n + 1]``, σ = √((1-ᾱ)/ᾱ) at
    each timestep, then the final σ (0 for ``"zero"``, σ at t = 0 for ``"sigma_min"``)."""
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(
            f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}"
        )
    ts = dpm_timesteps(schedule, num_inference_steps)
    ac = schedule.alphas_cumprod
    sigmas = (((1 - ac) / ac) ** 0.5).numpy()  # float32, computed by torch as diffusers does
    sigmas = np.interp(ts.numpy(), np.arange(0, len(sigmas)), sigmas)
    if final_sigmas_type == "sigma_min":
        sigma_last = float(((1 - ac[0]) / ac[0]) ** 0.5)
    else:
        sigma_last = 0.0
    return torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))


def dpm_first_order(num_inference_steps: int, final_sigmas_type: str = "zero") -> list[bool]:
    """Which steps are first order (step 0, and the last one as diffusers' defaults choose)."""
    n = int(num_inference_steps)
    out = []
    for k in range(n):
        lower_order_final = k == n - 1 and (n < 15 or final_sigmas_type == "zero")
        out.append(k == 0 or lower_order_final)
    return out


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``_sigma_to_alpha_sigma_t``: ``α = 1/√(σ²+1)``, ``σ_t = σ·α`` (float32)."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def dpm_coefficients(
    schedule, num_inference_steps: int, final_sigmas_type: str = "zero"
) -> dict[str, torch.Tensor]:
    """Per-step DPM-Solver++(2M) scalars, float32 ``[n]`` each, keyed by ``DPM_COEF_KEYS``.

    ``alpha_s``/``sigma_s`` convert the model output at step k into x̂0; ``A``, ``B``, ``C``,
    ``R`` are the update's scalars (module docstring); ``clip`` the clip range. Each value is
    the 0-dim float32 tensor diffusers computes in ``convert_model_output`` and
    ``dpm_solver_first_order_update`` / ``multistep_dpm_solver_second_order_update``.
    """
    sigmas = dpm_sigmas(schedule, num_inference_steps, final_sigmas_type)
    first = dpm_first_order(num_inference_steps, final_sigmas_type)
    rows = []
    zero = torch.zeros((), dtype=torch.float32)
    for k, is_first in enumerate(first):
        alpha_s, sigma_s = _alpha_sigma(sigmas[k])
        alpha_t, sigma_t = _alpha_sigma(sigmas[k + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s) - torch.log(sigma_s)
        h = lambda_t - lambda_s0
        A = sigma_t / sigma_s
        B = alpha_t * (torch.exp(-h) - 1.0)
        if is_first:
            C = R = zero
        else:
            alpha_s1, sigma_s1 = _alpha_sigma(sigmas[k - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            R = 1.0 / r0
            C = 0.5 * B
        clip = torch.tensor(float(schedule.clip_sample_range), dtype=torch.float32)
        rows.append(torch.stack([alpha_s, sigma_s, A, B, C, R, clip]).float())
    table = torch.stack(rows)  # [n, 7]
    return {key: table[:, i].contiguous() for i, key in enumerate(DPM_COEF_KEYS)}


def dpm_coef_table(
    schedule, num_inference_steps: int, final_sigmas_type: str = "zero"
) -> torch.Tensor:
    """The coefficients as the ``[n, 7]`` float32 table whose rows the update op reads."""
    c = dpm_coefficients(schedule, num_inference_steps, final_sigmas_type)
    return torch.stack([c[key] for key in DPM_COEF_KEYS], dim=1).contiguous()
