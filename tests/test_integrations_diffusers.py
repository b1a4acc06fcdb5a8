"""Loading diffusers models from local directories and sampling them protected."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from cpsample_fast.integrations.diffusers import (  # noqa: E402
    DiffusersEpsModel,
    from_pipeline,
    load_diffusers,
)
from cpsample_fast.reference import reference_sample  # noqa: E402


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def _diffusers_loop(unet, scheduler, x, n):
    scheduler.set_timesteps(n)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(x, t).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def test_load_pipeline_dir_and_match_diffusers(tmp_path):
    unet = _tiny_unet()
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing"
    )
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    assert list((tmp_path / "pipe" / "unet").glob("*.safetensors"))

    eps_model, schedule = load_diffusers(tmp_path / "pipe")
    assert isinstance(eps_model, DiffusersEpsModel)
    assert schedule.timestep_spacing == "trailing" and not schedule.clip_sample
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = reference_sample(eps_model, None, schedule, x_T.shape, num_inference_steps=6, noise=x_T)
    theirs = _diffusers_loop(unet, sched, x_T.clone(), 6)
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print("max rel err vs DDIMPipeline loop:", err)
    assert err < 1e-5

    eps2, schedule2 = from_pipeline(pipe)
    assert schedule2 == schedule
    assert torch.equal(eps2(x_T, torch.full((3,), 500)), eps_model(x_T, torch.full((3,), 500)))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="local diffusers directory"):
        load_diffusers(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers(tmp_path / "empty")
    _tiny_unet().save_pretrained(tmp_path / "unet_only")
    with pytest.raises(FileNotFoundError, match="scheduler"):
        load_diffusers(tmp_path / "unet_only")
    with pytest.raises(TypeError, match="pipeline must have"):
        from_pipeline(object())
