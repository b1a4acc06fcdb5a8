"""``NoiseSchedule``: betas, ᾱ, DDIM inference timesteps and step coefficients (docs/ALGORITHM.md
§1).

The schedule mirrors diffusers' ``DDIMScheduler`` config keys, defaults and float32 arithmetic, so
that a diffusers config converts one-to-one and every coefficient rounds exactly as diffusers
rounds it. As diffusers' ``ConfigMixin`` does, the constructor stays thin: the configuration is a
frozen, checked :class:`~cpsample_fast.schedule_config.ScheduleConfig` (``schedule.config``), and
the tables are computed by small functions in ``cpsample_fast.schedule_tables``, which keep
diffusers' operation order (``tests/test_schedule.py`` checks the results bit for bit). diffusers
is not imported here: it is a test dependency only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .constants import PREDICTION_TYPES  # noqa: F401  (re-exported)
from .schedule_config import (  # noqa: F401  (re-exported: the names' old home)
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    ScheduleConfig,
    check_real,
    diffusers_kwargs,
    is_int,
)
from .schedule_tables import (  # noqa: F401  (re-exported)
    COEFFICIENT_KEYS,
    cosine_betas,
    ddim_coefficients,
    inference_timesteps,
    make_betas,
)


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
        config: the checked, frozen :class:`ScheduleConfig` (each of its keys is also an
            attribute: ``schedule.clip_sample``, …).
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
        config = ScheduleConfig(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            clip_sample=clip_sample,
            clip_sample_range=clip_sample_range,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
        )
        self.config = config
        # the config's keys as attributes (schedule.clip_sample, …), read by every sampler
        vars(self).update({key: getattr(config, key) for key in ScheduleConfig.keys()})
        self.betas = make_betas(config)  # [T] float32
        self.alphas = 1.0 - self.betas  # [T]
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # [T]
        self.final_alpha_cumprod = (
            torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0].clone()
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
        return cls._ranged("linear", num_train_timesteps, beta_start, beta_end, kwargs)

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
        return cls._ranged("scaled_linear", num_train_timesteps, beta_start, beta_end, kwargs)

    @classmethod
    def _ranged(cls, beta_schedule, num_train_timesteps, beta_start, beta_end, kwargs):
        """The schedules given by a beta range (``linear``, ``scaled_linear``)."""
        return cls(num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                   beta_schedule=beta_schedule, **kwargs)  # fmt: skip

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
        return self.config.to_dict()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Rebuild a schedule from :meth:`to_config` output (missing keys take the defaults).

        Args:
            config: Dict with a subset of the constructor's keys.

        Raises:
            ValueError: on a key this schedule does not know (use :meth:`from_diffusers` for a
                diffusers config, which carries extra keys).
        """
        return cls(**ScheduleConfig.from_mapping(config).to_dict())

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
        return cls(**diffusers_kwargs(obj))

    # ----------------------------------------------------------------- inference timesteps

    def _check_steps(self, num_inference_steps: Any) -> int:
        if not is_int(num_inference_steps):
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
            ``trailing`` spacing follows diffusers' float grid, including its quirk for some
            ``n`` (:func:`~cpsample_fast.schedule_tables.inference_timesteps`).
        """
        return inference_timesteps(self.config, self._check_steps(num_inference_steps))

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

        Computed by :func:`~cpsample_fast.schedule_tables.ddim_coefficients` in diffusers' float32
        operation order (bit-identical; checked in ``tests/test_schedule.py``).

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
        eta = check_real("eta", eta)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        t = self.timesteps(n)  # [n]
        t_prev = t - self.num_train_timesteps // n  # [n]
        coefs = ddim_coefficients(self.alphas_cumprod, self.final_alpha_cumprod, t, t_prev, eta)
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
            if not is_int(t):
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
