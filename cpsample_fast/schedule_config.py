"""``ScheduleConfig``: the checked, frozen configuration of a ``NoiseSchedule`` (docs/ALGORITHM.md
§1), and its conversion from a diffusers scheduler config.

As diffusers' ``ConfigMixin`` keeps a scheduler's constructor thin, the configuration is one
frozen dataclass with diffusers' key names and ``DDIMScheduler``'s defaults, validated in one
place (``__post_init__``); ``NoiseSchedule`` builds its tables from it
(``cpsample_fast.schedule_tables``). diffusers is not imported here.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from .constants import PREDICTION_TYPES

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers config keys whose non-default values change the math in ways this package does not
# implement: refusing them beats sampling silently from a different process.
_UNSUPPORTED_DIFFUSERS: dict[str, Any] = {
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}
# schedulers whose configs carry DDIM's keys with DDIM's meaning
_DDIM_CONFIG_CLASSES = (None, "DDIMScheduler", "DDPMScheduler")
_SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def is_int(value: Any) -> bool:
    """An integral number that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_real(name: str, value: Any) -> float:
    """A finite real number (not a bool) as a float; ``TypeError``/``ValueError`` naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_int(name: str, value: Any, lo: int) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return str(value)


def _betas_tuple(trained_betas: Any, T: int) -> tuple[float, ...]:
    """Explicit betas as a tuple of ``T`` floats (rounded to float32, as the tables use them)."""
    if isinstance(trained_betas, torch.Tensor):
        betas = trained_betas.detach().to("cpu", torch.float32)
    else:
        try:
            betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"trained_betas must be a 1-D sequence of floats, got {trained_betas!r}"
            ) from err
    if betas.ndim != 1 or betas.numel() != T:
        raise ValueError(
            f"trained_betas must have shape [num_train_timesteps] = [{T}], got {list(betas.shape)}"
        )
    return tuple(betas.tolist())


@dataclass(frozen=True)
class ScheduleConfig:
    """diffusers ``DDIMScheduler``'s config keys and defaults (docs/CONTRACTS.md "Schedule"),
    checked on construction: ``TypeError``/``ValueError`` naming the offending key.
    ``trained_betas`` is stored as a tuple of floats (or None)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"

    def __post_init__(self) -> None:
        T = _check_int("num_train_timesteps", self.num_train_timesteps, lo=1)
        checked = {
            "num_train_timesteps": T,
            "beta_start": check_real("beta_start", self.beta_start),
            "beta_end": check_real("beta_end", self.beta_end),
            "beta_schedule": _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            "clip_sample": _check_bool("clip_sample", self.clip_sample),
            "set_alpha_to_one": _check_bool("set_alpha_to_one", self.set_alpha_to_one),
            "clip_sample_range": check_real("clip_sample_range", self.clip_sample_range),
            "steps_offset": _check_int("steps_offset", self.steps_offset, lo=0),
            "prediction_type": _check_choice(
                "prediction_type", self.prediction_type, PREDICTION_TYPES
            ),
            "timestep_spacing": _check_choice(
                "timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS
            ),
        }
        for name in ("beta_start", "beta_end"):
            if checked[name] < 0:  # scaled_linear takes √β: a negative β would turn complex
                raise ValueError(f"{name} must be >= 0, got {checked[name]}")
        if checked["clip_sample_range"] <= 0:
            raise ValueError(f"clip_sample_range must be > 0, got {checked['clip_sample_range']}")
        if self.trained_betas is not None:
            checked["trained_betas"] = _betas_tuple(self.trained_betas, T)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict (diffusers' key names; betas as a list)."""
        config = asdict(self)
        if self.trained_betas is not None:
            config["trained_betas"] = list(self.trained_betas)
        return config

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The config keys, in diffusers' order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> ScheduleConfig:
        """A config from a subset of its keys (the rest take the defaults); ``ValueError`` on a
        key this schedule does not know."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        unknown = sorted(set(config) - set(cls.keys()))
        if unknown:
            raise ValueError(
                f"config has unknown keys {unknown}; expected a subset of {sorted(cls.keys())} "
                "(use NoiseSchedule.from_diffusers for diffusers configs)"
            )
        return cls(**config)


def diffusers_kwargs(obj: Any) -> dict[str, Any]:
    """The ``ScheduleConfig`` keys of a diffusers scheduler (or its config mapping).

    Keys that only matter to other samplers are dropped; ``ValueError`` for the features this
    package does not implement (``thresholding``, ``rescale_betas_zero_snr``); ``UserWarning`` on
    what a DDIM schedule cannot honour (``_warn_unhonoured``).
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
    kwargs = {key: config[key] for key in ScheduleConfig.keys() if key in config}
    _warn_unhonoured(config, kwargs, None if obj is config else type(obj).__name__)
    if kwargs.get("trained_betas") is not None:
        kwargs["trained_betas"] = np.asarray(kwargs["trained_betas"])
    return kwargs


def _warn_unhonoured(config: Mapping[str, Any], kwargs: dict[str, Any], cls_name=None) -> None:
    """Say what ``from_diffusers`` drops (it converts to a DDIM schedule), never silently."""
    cls_name = config.get("_class_name", cls_name)
    if cls_name not in _DDIM_CONFIG_CLASSES:
        warnings.warn(
            f"from_diffusers: a {cls_name} config becomes a DDIM schedule (same betas); the "
            f"{cls_name} sampler itself is not kept — wrap it in "
            "cpsample_fast.diffusers.ProtectedScheduler to sample with it",
            stacklevel=4,
        )
        if "clip_sample" not in config:
            kwargs["clip_sample"] = False
            warnings.warn(
                f"from_diffusers: {cls_name} does not clip x0; using clip_sample=False",
                stacklevel=4,
            )
    for key in _SIGMA_KEYS:
        if config.get(key):
            warnings.warn(
                f"from_diffusers: {key}=True is not honoured; DDIM timesteps follow "
                f"timestep_spacing={config.get('timestep_spacing', 'leading')!r}",
                stacklevel=4,
            )
