"""``NoiseSchedule``: betas, ᾱ, DDIM inference timesteps and step coefficients (docs/ALGORITHM.md
§1).

The schedule mirrors diffusers' ``DDIMScheduler`` config keys, defaults and float32 arithmetic, so
that a diffusers config converts one-to-one and every coefficient rounds exactly as diffusers
rounds it. The operation order of ``DDIMScheduler.__init__``, ``set_timesteps``, ``_get_variance``
and ``step`` (diffusers 0.42) is kept on purpose; ``tests/test_schedule.py`` checks the results bit
for bit over a sweep of configs. diffusers is not imported here: it is a test dependency only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .constants import PREDICTION_TYPES

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
COEFFICIENT_KEYS = ("sqrt_alpha", "sqrt_one_minus_alpha", "sqrt_alpha_prev", "dir_coef", "sigma")

# Config keys and defaults of diffusers' DDIMScheduler that this schedule implements.
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# diffusers config keys whose non-default values change the math in ways this package does not
# implement: refusing them beats sampling silently from a different process.
_UNSUPPORTED_DIFFUSERS: dict[str, Any] = {
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}


# schedulers whose configs carry DDIM's keys with DDIM's meaning
_DDIM_CONFIG_CLASSES = (None, "DDIMScheduler", "DDPMScheduler")
_SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def _warn_unhonoured(config: Mapping[str, Any], kwargs: dict[str, Any], cls_name=None) -> None:
    """Say what ``from_diffusers`` drops (it converts to a DDIM schedule), never silently."""
    import warnings

    cls_name = config.get("_class_name", cls_name)
    if cls_name not in _DDIM_CONFIG_CLASSES:
        warnings.warn(
            f"from_diffusers: a {cls_name} config becomes a DDIM schedule (same betas); the "
            f"{cls_name} sampler itself is not kept — wrap it in "
            "cpsample_fast.diffusers.ProtectedScheduler to sample with it",
            stacklevel=3,
        )
        if "clip_sample" not in config:
            kwargs["clip_sample"] = False
            warnings.warn(
                f"from_diffusers: {cls_name} does not clip x0; using clip_sample=False",
                stacklevel=3,
            )
    for key in _SIGMA_KEYS:
        if config.get(key):
            warnings.warn(
                f"from_diffusers: {key}=True is not honoured; DDIM timesteps follow "
                f"timestep_spacing={config.get('timestep_spacing', 'leading')!r}",
                stacklevel=3,
            )


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
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


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return str(value)


class NoiseSchedule:
    """The diffusion noise schedule and DDIM step coefficients, as diffusers' ``DDIMScheduler``.

    Args:
        num_train_timesteps: Number of training timesteps ``T``.
        beta_start: First beta of the ``linear`` / ``scaled_linear`` schedules.
        beta_end: Last beta of the ``linear`` / ``scaled_linear`` schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"`` (cosine).
        trained_betas: Explicit betas (length ``T``, each in (0, 1)); overrides ``beta_schedule``.
        clip_sample: Clamp the predicted ``x0`` to ``±clip_sample_range`` in each step.
        clip_sample_range: Clip range, > 0.
        set_alpha_to_one: ``ᾱ' = 1`` when the previous timestep is negative (else ``ᾱ_0``).
        steps_offset: Offset added to ``leading`` inference timesteps (ignored by the other
            spacings, as in diffusers).
        prediction_type: What the model predicts: ``"epsilon"``, ``"v_prediction"``,
            ``"sample"``.
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``.

    Attributes:
        betas: float32 ``[T]``.
        alphas: float32 ``[T]``, ``1 - betas``.
        alphas_cumprod: float32 ``[T]``, ``ᾱ_t`` (``torch.cumprod(alphas)``).
        final_alpha_cumprod: float32 scalar tensor used when the previous timestep is negative.

    Raises:
        ValueError / TypeError: naming the offending argument.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        *,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
    ) -> None:
        if not _is_int(num_train_timesteps):
            raise TypeError(
                f"num_train_timesteps must be an int, got {type(num_train_timesteps).__name__}"
            )
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start = _check_real("beta_start", beta_start)
        self.beta_end = _check_real("beta_end", beta_end)
        for name, value in (("beta_start", self.beta_start), ("beta_end", self.beta_end)):
            if value < 0:  # scaled_linear takes √β: a negative β would turn complex
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.beta_schedule = _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        for name, value in (("clip_sample", clip_sample), ("set_alpha_to_one", set_alpha_to_one)):
            if not _is_bool(value):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.clip_sample = bool(clip_sample)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.clip_sample_range = _check_real("clip_sample_range", clip_sample_range)
        if self.clip_sample_range <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if not _is_int(steps_offset):
            raise TypeError(f"steps_offset must be an int, got {type(steps_offset).__name__}")
        if steps_offset < 0:
            raise ValueError(f"steps_offset must be >= 0, got {steps_offset}")
        self.steps_offset = int(steps_offset)
        self.prediction_type = _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.timestep_spacing = _check_choice(
            "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS
        )

        T = self.num_train_timesteps
        if trained_betas is not None:
            if isinstance(trained_betas, torch.Tensor):
                betas = trained_betas.detach().to("cpu", torch.float32).clone()
            else:
                try:
                    betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
                except (TypeError, ValueError) as err:
                    raise TypeError(
                        f"trained_betas must be a 1-D sequence of floats, got {trained_betas!r}"
                    ) from err
            if betas.ndim != 1 or betas.numel() != T:
                raise ValueError(
                    f"trained_betas must have shape [num_train_timesteps] = [{T}], "
                    f"got {list(betas.shape)}"
                )
            self.trained_betas: tuple[float, ...] | None = tuple(betas.tolist())
        else:
            self.trained_betas = None
            if self.beta_schedule == "linear":
                betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
            elif self.beta_schedule == "scaled_linear":
                # Latent-diffusion schedule: linear in sqrt(beta), squared in float32 as diffusers.
                betas = (
                    torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32)
                    ** 2
                )
            else:
                betas = _cosine_betas(T)
        # β = 0 makes √(1-ᾱ_t) = 0 at t = 0 (0/0 in the variance), β = 1 makes ᾱ = 0 (division
        # by √ᾱ): both break the DDIM step, so refuse them up front.
        ok = torch.isfinite(betas) & (betas > 0) & (betas < 1)
        if not ok.all():
            k = int(torch.nonzero(~ok)[0])
            origin = (
                "trained_betas"
                if self.trained_betas is not None
                else f"beta_start/beta_end with beta_schedule={self.beta_schedule!r}"
            )
            raise ValueError(f"{origin} must give betas in (0, 1), got betas[{k}] = {betas[k]}")
        self.betas = betas  # [T] float32
        self.alphas = 1.0 - self.betas  # [T]
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # [T]
        self.final_alpha_cumprod = (
            torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0].clone()
        )
        self._device_cumprod: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # ----------------------------------------------------------------- constructors

    @classmethod
    def linear(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        **kwargs: Any,
    ) -> NoiseSchedule:
        """DDPM's linear beta schedule (diffusers ``beta_schedule="linear"``).

        Args:
            num_train_timesteps: ``T``.
            beta_start: First beta.
            beta_end: Last beta.
            **kwargs: Other constructor options (``prediction_type``, ``timestep_spacing``, …).
        """
        return cls(
            num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule="linear",
            **kwargs,
        )

    @classmethod
    def scaled_linear(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        **kwargs: Any,
    ) -> NoiseSchedule:
        """Latent diffusion's schedule, linear in √β (diffusers ``"scaled_linear"``).

        The defaults are Stable Diffusion's (0.00085, 0.012).

        Args:
            num_train_timesteps: ``T``.
            beta_start: First beta.
            beta_end: Last beta.
            **kwargs: Other constructor options.
        """
        return cls(
            num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule="scaled_linear",
            **kwargs,
        )

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, **kwargs: Any) -> NoiseSchedule:
        """Glide / improved-DDPM cosine schedule (diffusers ``"squaredcos_cap_v2"``).

        Args:
            num_train_timesteps: ``T``.
            **kwargs: Other constructor options.
        """
        return cls(num_train_timesteps, beta_schedule="squaredcos_cap_v2", **kwargs)

    @classmethod
    def from_betas(
        cls, betas: Sequence[float] | np.ndarray | torch.Tensor, **kwargs: Any
    ) -> NoiseSchedule:
        """A schedule with explicit betas (diffusers ``trained_betas``); ``T = len(betas)``.

        Args:
            betas: ``[T]`` betas, each in (0, 1).
            **kwargs: Other constructor options.
        """
        n = len(betas)
        return cls(n, trained_betas=betas, **kwargs)

    def to_config(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-able dict (diffusers' key names)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "trained_betas": None if self.trained_betas is None else list(self.trained_betas),
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "set_alpha_to_one": self.set_alpha_to_one,
            "steps_offset": self.steps_offset,
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.timestep_spacing,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Rebuild a schedule from :meth:`to_config` output (missing keys take the defaults).

        Args:
            config: Dict with a subset of the constructor's keys.

        Raises:
            ValueError: on a key this schedule does not know (use :meth:`from_diffusers` for a
                diffusers config, which carries extra keys).
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_DEFAULTS))
        if unknown:
            raise ValueError(
                f"config has unknown keys {unknown}; expected a subset of {sorted(_DEFAULTS)} "
                "(use NoiseSchedule.from_diffusers for diffusers configs)"
            )
        return cls(**config)

    @classmethod
    def from_diffusers(cls, obj: Any) -> NoiseSchedule:
        """Convert a diffusers scheduler (or its config) into a ``NoiseSchedule``.

        Accepts any scheduler whose config carries the DDIM keys (``DDIMScheduler``,
        ``DDPMScheduler``, …) or the config itself (``FrozenDict`` / ``dict``). Keys that only
        matter to other samplers (``variance_type``, ``_class_name``, …) are ignored; keys absent
        from the config take ``DDIMScheduler``'s defaults.

        Args:
            obj: A diffusers scheduler instance or its config mapping.

        Raises:
            ValueError: for features this package does not implement (``thresholding=True``,
                ``rescale_betas_zero_snr=True``) or unknown ``beta_schedule`` /
                ``timestep_spacing`` / ``prediction_type`` values, naming the key.

        Warns (``UserWarning``) on what a DDIM schedule cannot honour: a config of another
        sampler (Euler, DPM-Solver, …; its noise levels are kept, its sampler is not — use
        ``cpsample_fast.diffusers.ProtectedScheduler`` to keep it), Karras/exponential/beta
        sigmas, and a missing ``clip_sample`` in such a config (then ``clip_sample=False``: those
        samplers do not clip).
        """
        config = getattr(obj, "config", obj)
        if not isinstance(config, Mapping):
            raise TypeError(
                "from_diffusers expects a diffusers scheduler or its config mapping, "
                f"got {type(obj).__name__}"
            )
        for key, supported in _UNSUPPORTED_DIFFUSERS.items():
            if key in config and bool(config[key]) != supported:
                raise ValueError(
                    f"diffusers config key {key}={config[key]!r} is not supported by "
                    f"NoiseSchedule (only {key}={supported!r})"
                )
        kwargs = {key: config[key] for key in _DEFAULTS if key in config}
        _warn_unhonoured(config, kwargs, None if obj is config else type(obj).__name__)
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = np.asarray(kwargs["trained_betas"])
        return cls(**kwargs)

    # ----------------------------------------------------------------- inference timesteps

    def _check_steps(self, num_inference_steps: Any) -> int:
        if not _is_int(num_inference_steps):
            raise TypeError(
                f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}"
            )
        n = int(num_inference_steps)
        if not 1 <= n <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must lie in 1..num_train_timesteps "
                f"(= {self.num_train_timesteps}), got {n}"
            )
        return n

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Descending inference timesteps, as ``DDIMScheduler.set_timesteps(n).timesteps``.

        Args:
            num_inference_steps: ``n`` in ``1..T``.

        Returns:
            int64 ``[n]`` (CPU).

        Note:
            For ``trailing`` spacing diffusers 0.42 builds the grid with a float
            ``np.arange(T, 0, -T/n)``, which for some ``n`` (158 values at T = 1000, e.g. 61, 103)
            emits one extra timestep ``-1``. We build the same grid and keep its first ``n``
            entries, which equal diffusers' first ``n``.
        """
        n = self._check_steps(num_inference_steps)
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            step_ratio = T // n
            ts = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
            ts += self.steps_offset
            if ts[0] > T - 1:
                raise ValueError(
                    f"steps_offset={self.steps_offset} with num_inference_steps={n} gives "
                    f"timestep {int(ts[0])} > num_train_timesteps - 1 = {T - 1}"
                )
        else:  # trailing
            step_ratio = T / n
            ts = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64)[:n]
            ts -= 1
        return torch.from_numpy(ts)

    def prev_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Previous timesteps ``t - T // n`` (may be negative), as ``DDIMScheduler.step``.

        With ``trailing`` / ``linspace`` spacing this is not always the next listed timestep;
        diffusers steps to it anyway and so do we (docs/ALGORITHM.md §3).

        Args:
            num_inference_steps: ``n`` in ``1..T``.

        Returns:
            int64 ``[n]`` (CPU).
        """
        ts = self.timesteps(num_inference_steps)
        return ts - self.num_train_timesteps // int(num_inference_steps)

    def step_coefficients(
        self,
        num_inference_steps: int,
        eta: float = 0.0,
        *,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-step DDIM coefficients, rounded exactly as ``DDIMScheduler.step`` rounds them.

        Keys (each float32 ``[n]``, in loop order): ``sqrt_alpha`` = √ᾱ_t,
        ``sqrt_one_minus_alpha`` = √(1-ᾱ_t), ``sqrt_alpha_prev`` = √ᾱ',
        ``dir_coef`` = √(1-ᾱ'-σ²), ``sigma`` = η·√((1-ᾱ')/(1-ᾱ_t)·(1-ᾱ_t/ᾱ')) (docs/ALGORITHM.md §3
        step 7).

        The elementwise float32 ops below are diffusers' own (``x ** 0.5`` is ``sqrt`` and
        ``x ** 2`` is ``x * x`` in torch), applied to a vector instead of one 0-dim tensor per
        step; IEEE rounding makes both bit-identical (checked in ``tests/test_schedule.py``).

        Args:
            num_inference_steps: ``n`` in ``1..T``.
            eta: DDIM η >= 0 (0 = deterministic DDIM, 1 = DDPM-like variance).
            device: Where to put the tensors (computed on the CPU, like diffusers).

        Returns:
            Dict of the five coefficient tensors.

        Raises:
            ValueError: ``n`` outside ``1..T``, ``eta < 0``, or ``eta > 1`` so large that
                ``1 - ᾱ' - σ² < 0``.
        """
        n = self._check_steps(num_inference_steps)
        eta = _check_real("eta", eta)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        t = self.timesteps(n)  # [n]
        t_prev = t - self.num_train_timesteps // n  # [n]
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = torch.where(
            t_prev >= 0, self.alphas_cumprod[t_prev.clamp_min(0)], self.final_alpha_cumprod
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
        coefs = {
            "sqrt_alpha": alpha_prod_t ** (0.5),
            "sqrt_one_minus_alpha": beta_prod_t ** (0.5),
            "sqrt_alpha_prev": alpha_prod_t_prev ** (0.5),
            "dir_coef": dir_sq ** (0.5),
            "sigma": std_dev_t,
        }
        if device is not None:
            coefs = {k: v.to(device) for k, v in coefs.items()}
        return coefs

    # ----------------------------------------------------------------- forward process

    def add_noise(
        self,
        x0: torch.Tensor,  # [B, ...]
        noise: torch.Tensor,  # [B, ...]
        t: torch.Tensor | int,  # int64 [B] (or scalar)
    ) -> torch.Tensor:
        """Forward diffusion ``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε``, as diffusers' ``add_noise``.

        Args:
            x0: Clean samples ``[B, ...]`` (floating point).
            noise: ``ε``, same shape as ``x0``.
            t: Integer training timesteps, ``[B]`` or a scalar, in ``0..T-1``.

        Returns:
            ``x_t`` with the shape and dtype of ``x0``.
        """
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
            raise TypeError("x0 must be a floating-point tensor [B, ...]")
        if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
            raise ValueError(
                f"noise must be a tensor of x0's shape {list(x0.shape)}, "
                f"got {list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise)}"
            )
        if not isinstance(t, torch.Tensor):
            if not _is_int(t):
                raise TypeError(f"t must be an int64 tensor [B] or an int, got {type(t).__name__}")
            t = torch.tensor(int(t), dtype=torch.int64)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer tensor, got dtype {t.dtype}")
        if t.ndim > 1 or (t.ndim == 1 and x0.ndim >= 1 and t.shape[0] != x0.shape[0]):
            raise ValueError(
                f"t must have shape [B] = [{x0.shape[0] if x0.ndim else ''}] or be a scalar, "
                f"got {list(t.shape)}"
            )
        # Range check only where it costs no host sync; CUDA indexing asserts on its own.
        if (
            t.device.type == "cpu"
            and t.numel()
            and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps)
        ):
            raise ValueError(
                f"t must lie in 0..{self.num_train_timesteps - 1}, "
                f"got range [{int(t.min())}, {int(t.max())}]"
            )
        key = (x0.device, x0.dtype)
        cumprod = self._device_cumprod.get(key)
        if cumprod is None:
            cumprod = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
            self._device_cumprod[key] = cumprod
        return forward_noise(x0, noise, t, cumprod)

    # ----------------------------------------------------------------- dunder

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoiseSchedule):
            return NotImplemented
        return self.to_config() == other.to_config()

    def __hash__(self) -> int:
        config = self.to_config()
        if config["trained_betas"] is not None:
            config["trained_betas"] = tuple(config["trained_betas"])
        return hash(tuple(sorted(config.items())))

    def __repr__(self) -> str:
        config = self.to_config()
        if self.trained_betas is not None:
            config["trained_betas"] = f"<{len(self.trained_betas)} values>"
            del config["beta_start"], config["beta_end"], config["beta_schedule"]
        elif self.beta_schedule == "squaredcos_cap_v2":
            del config["beta_start"], config["beta_end"]
            del config["trained_betas"]
        else:
            del config["trained_betas"]
        args = ", ".join(
            f"{k}={v}" if k == "trained_betas" else f"{k}={v!r}" for k, v in config.items()
        )
        return f"NoiseSchedule({args})"


def alphas_cumprod_of(schedule: Any) -> torch.Tensor:
    """ᾱ ``[T]`` as float32 from a :class:`NoiseSchedule` (anything with ``alphas_cumprod``) or
    from that tensor itself; TypeError otherwise."""
    ac = getattr(schedule, "alphas_cumprod", schedule)
    if not isinstance(ac, torch.Tensor) or ac.dim() != 1:
        raise TypeError("schedule must have alphas_cumprod (a float tensor [T]) or be that tensor")
    return ac.float()


def forward_noise(
    x0: torch.Tensor,  # [B, ...]
    noise: torch.Tensor,  # [B, ...]
    t: torch.Tensor,  # int64 [B] (or 0-dim)
    alphas_cumprod: torch.Tensor,  # [T]
) -> torch.Tensor:
    """``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε`` (docs/ALGORITHM.md §1) in ``x0``'s dtype, as diffusers'
    ``add_noise``: the one forward-noising formula of the package. Unchecked (callers validate);
    :meth:`NoiseSchedule.add_noise` is the checked public form."""
    a = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
    shape = (-1,) + (1,) * (x0.ndim - 1) if a.ndim == 1 else ()
    sqrt_alpha = (a**0.5).reshape(shape)
    sqrt_one_minus_alpha = ((1 - a) ** 0.5).reshape(shape)
    return sqrt_alpha * x0 + sqrt_one_minus_alpha * noise
