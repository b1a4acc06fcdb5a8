"""``models.load_eps_model`` (what ``--model`` names) and ``models.sample_shape``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cpsample_fast.models import SmallUNet, load_eps_model, sample_shape, save_checkpoint
from cpsample_fast.schedule import NoiseSchedule


def test_sample_shape_of_package_and_diffusers_style_configs():
    assert sample_shape(SmallUNet("digits")) == (1, 16, 16)
    # diffusers: the UNet sits behind an adapter, its config is attribute-style
    config = SimpleNamespace(in_channels=4, sample_size=(8, 12))
    adapter = SimpleNamespace(unet=SimpleNamespace(config=config))
    assert sample_shape(adapter) == (4, 8, 12)
    assert sample_shape(SimpleNamespace(config={"channels": 3, "image_size": 32})) == (3, 32, 32)
    with pytest.raises(ValueError, match=r"sample shape \(C, H, W\)"):
        sample_shape(torch.nn.Identity())


def test_load_eps_model_digits_and_checkpoint(tmp_path):
    model, schedule = load_eps_model("digits", torch.device("cpu"))
    assert sample_shape(model) == (1, 16, 16)
    assert torch.equal(schedule.alphas_cumprod, NoiseSchedule().alphas_cumprod)

    unet = SmallUNet("tiny")
    cosine = NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    meta = {"unet_config": unet.config.to_dict(), "schedule": cosine.to_config()}
    save_checkpoint(tmp_path / "u.safetensors", unet, meta)
    loaded, schedule = load_eps_model(str(tmp_path / "u.safetensors"), torch.device("cpu"))
    assert torch.equal(schedule.alphas_cumprod, cosine.alphas_cumprod)
    x, t = torch.randn(2, *sample_shape(unet)), torch.tensor([3, 500])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), unet(x, t), rtol=0, atol=0)

    save_checkpoint(tmp_path / "v.safetensors", unet, {"unet_config": unet.config.to_dict()})
    with pytest.raises(ValueError, match="training 'schedule'"):
        load_eps_model(str(tmp_path / "v.safetensors"), "cpu")


def test_load_eps_model_names_the_option_on_bad_input():
    with pytest.raises(ValueError, match="--model must be a diffusers directory"):
        load_eps_model("model.pt", "cpu")


def test_cli_sample_keeps_its_old_names():
    """``cli.sample`` re-exports what moved into the library (old import paths keep working)."""
    from cpsample_fast import distributed
    from cpsample_fast.cli import sample

    assert sample.load_eps_model is load_eps_model
    assert sample.merge_run is distributed.merge_run
    assert sample.audit_record is distributed.audit_record
