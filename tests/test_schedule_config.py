"""ScheduleConfig (the checked, frozen config behind NoiseSchedule) and the table functions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cpsample_fast.schedule import NoiseSchedule
from cpsample_fast.schedule_config import ScheduleConfig
from cpsample_fast.schedule_tables import (
    COEFFICIENT_KEYS,
    ddim_coef_table,
    inference_timesteps,
    make_betas,
)


def test_config_is_frozen_and_is_the_schedules_attributes():
    sched = NoiseSchedule.scaled_linear(100, prediction_type="v_prediction", clip_sample=False)
    assert isinstance(sched.config, ScheduleConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.config.clip_sample = True
    for key in ScheduleConfig.keys():
        assert getattr(sched, key) == getattr(sched.config, key), key
    assert sched.to_config() == sched.config.to_dict()
    assert NoiseSchedule.from_config(sched.to_config()) == sched


def test_keys_are_diffusers_ddim_keys_in_order():
    assert ScheduleConfig.keys() == (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
        "clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset",
        "prediction_type", "timestep_spacing",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"num_train_timesteps": 0}, ValueError, "num_train_timesteps"),
        ({"num_train_timesteps": 10.0}, TypeError, "num_train_timesteps"),
        ({"beta_start": -1e-4}, ValueError, "beta_start"),
        ({"beta_end": float("nan")}, ValueError, "beta_end"),
        ({"clip_sample": 1}, TypeError, "clip_sample"),
        ({"clip_sample_range": 0.0}, ValueError, "clip_sample_range"),
        ({"steps_offset": -1}, ValueError, "steps_offset"),
        ({"prediction_type": "eps"}, ValueError, "prediction_type"),
        ({"timestep_spacing": "even"}, ValueError, "timestep_spacing"),
        ({"beta_schedule": "cosine"}, ValueError, "beta_schedule"),
        ({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}, ValueError, "trained_betas"),
    ],
)
def test_each_bad_key_is_named(kwargs, error, name):
    with pytest.raises(error, match=name):
        ScheduleConfig(**kwargs)
    with pytest.raises(error, match=name):  # the schedule checks through the same config
        NoiseSchedule(**kwargs)


def test_trained_betas_are_stored_as_float32_rounded_tuple():
    betas = torch.linspace(1e-4, 0.02, 7, dtype=torch.float64)
    config = ScheduleConfig(num_train_timesteps=7, trained_betas=betas)
    assert isinstance(config.trained_betas, tuple)
    assert torch.equal(make_betas(config), betas.float())


def test_from_mapping_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        ScheduleConfig.from_mapping({"variance_type": "fixed_small"})
    with pytest.raises(TypeError, match="mapping"):
        ScheduleConfig.from_mapping([("beta_start", 1e-4)])


def test_table_functions_serve_the_schedule():
    sched = NoiseSchedule.linear(1000, timestep_spacing="trailing", clip_sample_range=2.5)
    assert torch.equal(inference_timesteps(sched.config, 61), sched.timesteps(61))
    assert torch.equal(make_betas(sched.config), sched.betas)
    table = ddim_coef_table(sched, 12, 0.7)
    coefs = sched.step_coefficients(12, 0.7)
    assert table.shape == (12, 6) and table.dtype == torch.float32 and table.is_contiguous()
    for i, key in enumerate(COEFFICIENT_KEYS):
        assert torch.equal(table[:, i], coefs[key]), key
    assert torch.all(table[:, 5] == 2.5)
