"""Honest conversion: from_pipeline refuses other samplers, from_diffusers warns on drops."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_tiny import C, H, tiny_unet  # noqa: E402

from cpsample_fast.integrations.diffusers import from_pipeline  # noqa: E402
from cpsample_fast.schedule import NoiseSchedule  # noqa: E402


def test_from_pipeline_refuses_ddpm_unless_asked_and_freezes_the_unet():
    unet = tiny_unet().train().requires_grad_(True)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="DDPMScheduler.*CPSamplePipeline.from_pipe"):
        from_pipeline(pipe)
    eps, schedule = from_pipeline(pipe, as_ddim=True)
    assert schedule.num_train_timesteps == 1000
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    euler = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler())
    euler.scheduler = diffusers.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        from_pipeline(euler)


def test_from_pipeline_passes_unet_kwargs():
    unet = tiny_unet(num_class_embeds=3).requires_grad_(True).train()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    labels = torch.tensor([2, 0])
    eps, _ = from_pipeline(pipe, class_labels=labels)
    x, t = torch.randn(2, C, H, H), torch.tensor([500, 500])
    want = unet(x, t, class_labels=labels).sample
    assert torch.equal(eps(x, t), want)
    assert not torch.equal(eps(x, t), unet(x, t, class_labels=labels.flip(0)).sample)


def test_learned_variance_unet_returns_the_prediction_channels():
    unet = tiny_unet(out_channels=2 * C)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    eps, _ = from_pipeline(pipe)
    x, t = torch.randn(2, C, H, H), torch.tensor([10, 900])
    got = eps(x, t)
    assert got.shape == x.shape
    assert torch.equal(got, unet(x, t).sample[:, :C])


def test_from_diffusers_warns_on_what_it_cannot_honour():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DDIM and DDPM configs convert silently, as before
        NoiseSchedule.from_diffusers(diffusers.DDIMScheduler())
        NoiseSchedule.from_diffusers(diffusers.DDPMScheduler())
    euler = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)
    with pytest.warns(UserWarning) as record:
        sched = NoiseSchedule.from_diffusers(euler)
    text = " | ".join(str(w.message) for w in record)
    assert "EulerDiscreteScheduler" in text and "use_karras_sigmas" in text
    assert "clip_sample=False" in text and not sched.clip_sample
    assert torch.equal(sched.alphas_cumprod, euler.alphas_cumprod)
    with pytest.warns(UserWarning, match="DPMSolverMultistepScheduler"):
        # a saved scheduler_config.json names its class
        saved = json.loads(diffusers.DPMSolverMultistepScheduler().to_json_string())
        NoiseSchedule.from_diffusers(saved)
