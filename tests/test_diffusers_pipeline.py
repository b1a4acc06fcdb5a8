"""CPSamplePipeline.from_pipe: unconditional and class-conditional UNet2DModel pipelines."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_tiny import C, H, LinearProtector, tiny_unet  # noqa: E402

from cpsample_fast.diffusers import CPSamplePipeline, ProtectedScheduler  # noqa: E402
from cpsample_fast.protector.model import ProtectorNet  # noqa: E402


def _ddim_pipe(**config):
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_from_pipe_scale0_reproduces_ddim_pipeline(eta):
    pipe = _ddim_pipe()
    kw = dict(batch_size=3, num_inference_steps=5, eta=eta, output_type="pt")
    base = pipe(generator=_gen(), **kw).images
    ours = CPSamplePipeline.from_pipe(pipe, protector=LinearProtector(), scale=0.0, alpha=0.1)
    ours.set_progress_bar_config(disable=True)
    got = ours(generator=_gen(), **kw).images
    assert ours.last_path == "cpsampler"
    assert (got - base).abs().max().item() <= 1e-5
    # one generator per sample, as diffusers accepts
    gens = [_gen(s) for s in (1, 2, 3)]
    base = pipe(generator=gens, **kw).images
    got = ours(generator=[_gen(s) for s in (1, 2, 3)], **kw).images
    assert (got - base).abs().max().item() <= 1e-5


@pytest.mark.parametrize("clip", [False, True])
def test_from_pipe_guided_fast_path_equals_protected_scheduler_path(clip):
    pipe = _ddim_pipe(clip_sample=clip)
    prot = LinearProtector(k=3.0)
    kw = dict(batch_size=4, num_inference_steps=5, eta=1.0, output_type="pt")
    fast = CPSamplePipeline.from_pipe(pipe, protector=prot, scale=20.0, alpha=0.5)
    fast.set_progress_bar_config(disable=True)
    a = fast(generator=_gen(), **kw).images
    assert fast.last_path == "cpsampler" and fast.trace.gate.any()
    pipe.scheduler = ProtectedScheduler(pipe.scheduler, prot, scale=20.0, alpha=0.5)
    b = pipe(generator=_gen(), **kw).images
    assert (a - b).abs().max().item() <= 1e-4
    plain = _ddim_pipe(clip_sample=clip)(generator=_gen(), **kw).images
    assert (a - plain).abs().max().item() > 1e-2


def _class_unet():
    return tiny_unet(num_class_embeds=3)


def _class_loop(unet, scheduler, labels, n, generator, eta=0.0):
    """A class-conditional diffusers loop, drawn as DDIMPipeline draws."""
    x = torch.randn(len(labels), C, H, H, generator=generator)
    scheduler.set_timesteps(n)
    x = x * scheduler.init_noise_sigma
    extra = {"generator": generator}
    if "eta" in __import__("inspect").signature(scheduler.step).parameters:
        extra["eta"] = eta
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
        x = scheduler.step(out, t, x, **extra).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("sched_name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"])
def test_class_conditional_scale0_reproduces_diffusers(sched_name):
    unet = _class_unet()
    labels = torch.tensor([0, 2, 1])
    sched = getattr(diffusers, sched_name)()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.scheduler = sched  # DDIMPipeline's init would convert it to DDIM
    ours = CPSamplePipeline.from_pipe(pipe, protector=LinearProtector(), scale=0.0, alpha=0.1)
    ours.set_progress_bar_config(disable=True)
    n = 4 if sched_name != "DDPMScheduler" else 6
    got = ours(
        batch_size=3, generator=_gen(), num_inference_steps=n, output_type="pt", class_labels=labels
    ).images
    want = _class_loop(unet, getattr(diffusers, sched_name)(), labels, n, _gen())
    assert ours.last_path == ("cpsampler" if sched_name == "DDIMScheduler" else "scheduler")
    assert (got - want).abs().max().item() <= 1e-5
    # the labels condition the samples; guided runs stay finite
    other = ours(
        batch_size=3, generator=_gen(), num_inference_steps=n, output_type="pt", class_labels=1
    ).images
    assert not torch.allclose(other, got)
    guided = CPSamplePipeline.from_pipe(
        pipe, protector=LinearProtector(k=3.0), scale=20.0, alpha=0.5
    )
    guided.set_progress_bar_config(disable=True)
    out = guided(
        batch_size=3, generator=_gen(), num_inference_steps=n, output_type="np", class_labels=labels
    ).images
    assert out.shape == (3, H, H, C) and guided.trace.gate.any()


def test_ddpm_pipeline_samples_ddpm_not_ddim():
    unet = tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    base = pipe(batch_size=2, generator=_gen(), num_inference_steps=5, output_type="np").images
    ours = CPSamplePipeline.from_pipe(pipe, protector=LinearProtector(), scale=0.0, alpha=0.1)
    ours.set_progress_bar_config(disable=True)
    got = ours(batch_size=2, generator=_gen(), num_inference_steps=5, output_type="np").images
    assert ours.last_path == "scheduler"
    assert abs(got - base).max() <= 1e-5


def test_from_pipe_bad_input():
    pipe = _ddim_pipe()
    with pytest.raises(ValueError, match="in_channels=3"):
        CPSamplePipeline.from_pipe(pipe, protector=ProtectorNet(in_channels=3), scale=1, alpha=0.1)
    with pytest.raises(ValueError, match="resolution=16"):
        CPSamplePipeline.from_pipe(
            pipe, protector=ProtectorNet(in_channels=C, resolution=16), scale=1, alpha=0.1
        )

    class NoUnet:
        scheduler = diffusers.DDIMScheduler()

    with pytest.raises(ValueError, match="has no .unet"):
        CPSamplePipeline.from_pipe(NoUnet(), protector=LinearProtector(), scale=1, alpha=0.1)
    pipe.scheduler = diffusers.PNDMScheduler()
    with pytest.raises(ValueError, match="supported"):
        CPSamplePipeline.from_pipe(pipe, protector=LinearProtector(), scale=1, alpha=0.1)
    ours = CPSamplePipeline.from_pipe(_ddim_pipe(), protector=LinearProtector(), scale=1, alpha=0.1)
    with pytest.raises(ValueError, match="not class-conditional"):
        ours(batch_size=2, class_labels=[0, 1])
    with pytest.raises(ValueError, match="one per sample"):
        ours(batch_size=2, generator=[_gen()])
    cond = diffusers.DDIMPipeline(unet=_class_unet(), scheduler=diffusers.DDIMScheduler())
    ours = CPSamplePipeline.from_pipe(cond, protector=LinearProtector(), scale=1, alpha=0.1)
    with pytest.raises(ValueError, match="class_labels is required"):
        ours(batch_size=2)
    with pytest.raises(ValueError, match=r"2 \(batch_size\) labels"):
        ours(batch_size=2, class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\)"):
        ours(batch_size=2, class_labels=[0, 3])


def test_protector_is_a_pipeline_component_saved_as_safetensors(tmp_path):
    from cpsample_fast.diffusers import ProtectorComponent

    net = ProtectorNet(in_channels=C, resolution=H, base_channels=8).eval()
    ours = CPSamplePipeline.from_pipe(_ddim_pipe(), protector=net, scale=20.0, alpha=0.5)
    ours.set_progress_bar_config(disable=True)
    assert isinstance(ours.protector, ProtectorComponent)
    assert ours.protector.dtype == torch.float32 and ours.protector.device.type == "cpu"
    assert not any(p.requires_grad for p in ours.protector.parameters())
    x, t = torch.randn(2, C, H, H), torch.tensor([3, 700])
    assert torch.equal(ours.protector(x, t), net(x, t))
    kw = dict(batch_size=2, num_inference_steps=3, output_type="pt")
    a = ours(generator=_gen(), **kw).images
    ours.save_pretrained(tmp_path / "p", safe_serialization=True)
    assert (tmp_path / "p" / "protector" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "p").rglob("*.bin"))
    loaded = CPSamplePipeline.from_pretrained(tmp_path / "p", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.protector, ProtectorComponent)
    assert loaded.scale == 20.0 and loaded.alpha == 0.5 and loaded.mode == "repel"
    b = loaded(generator=_gen(), **kw).images
    assert torch.equal(a, b)
    assert ours.protector.to(torch.bfloat16).dtype == torch.bfloat16
