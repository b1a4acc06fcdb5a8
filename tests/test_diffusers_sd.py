"""StableDiffusionCPSamplePipeline on a tiny SD pipeline built offline (no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from cpsample_fast.diffusers import StableDiffusionCPSamplePipeline  # noqa: E402
from cpsample_fast.protector.model import ProtectorNet  # noqa: E402

LATENT, SIZE = 4, 16  # latent channels; latent side (images are 32×32 through a 2× VAE)


def _tokenizer():
    """A CLIP BPE tokenizer over the byte alphabet plus two merges, written here."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return transformers.CLIPTokenizer(
        vocab=vocab, merges=[("c", "a"), ("ca", "t</w>")], model_max_length=16
    )


def tiny_sd_pipe(scheduler=None):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=SIZE,
        in_channels=LATENT,
        out_channels=LATENT,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=LATENT,
        norm_num_groups=4,
        layers_per_block=1,
    )
    tok = _tokenizer()
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=16,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    scheduler = scheduler or diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=tok,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class LatentLinearProtector(nn.Module):
    def __init__(self, k=3.0):
        super().__init__()
        w = torch.randn(LATENT * SIZE * SIZE, generator=torch.Generator().manual_seed(1))
        self.register_buffer("w", w / w.norm())
        self.k = k
        self.eval()

    def forward(self, x, t):
        return self.k * (x.flatten(1) @ self.w)


def _call(pipe, seed=0, **kw):
    args = dict(
        prompt=["a cat", "cat"],
        negative_prompt=["a", "c"],
        guidance_scale=3.0,
        num_inference_steps=3,
        num_images_per_prompt=2,
        output_type="pt",
    )
    args.update(kw)
    args.setdefault("generator", torch.Generator().manual_seed(seed))
    return pipe(**args).images


@pytest.mark.parametrize("sched", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_sd_scale0_reproduces_and_guided_differs_where_the_gate_opened(sched):
    base_pipe = tiny_sd_pipe()
    base_pipe.scheduler = getattr(diffusers, sched).from_config(base_pipe.scheduler.config)
    base = _call(base_pipe)
    assert base.shape == (4, 3, 32, 32)
    prot = LatentLinearProtector()
    ours = StableDiffusionCPSamplePipeline.from_pipe(base_pipe, protector=prot, scale=0, alpha=0.1)
    ours.set_progress_bar_config(disable=True)
    assert (_call(ours) - base).abs().max().item() <= 1e-5
    guided = StableDiffusionCPSamplePipeline.from_pipe(
        base_pipe, protector=prot, scale=30.0, alpha=0.1, guidance_range=(600, 1000)
    )
    guided.set_progress_bar_config(disable=True)
    got = _call(guided)
    assert torch.isfinite(got).all()
    gated = guided.trace.gate.any(dim=0)
    assert gated.shape == (4,) and gated.any()
    diff = (got - base).flatten(1).abs().amax(dim=1)
    assert torch.equal(diff[~gated], torch.zeros_like(diff[~gated]))
    assert (diff[gated] > 0).all()
    # the registered scheduler is still the plain one (save_pretrained writes a normal dir)
    assert type(guided.scheduler).__name__ == sched


def test_sd_callback_latents_and_save_roundtrip(tmp_path):
    pipe = tiny_sd_pipe()
    net = ProtectorNet(in_channels=LATENT, resolution=SIZE, base_channels=8).eval()
    ours = StableDiffusionCPSamplePipeline.from_pipe(pipe, protector=net, scale=10.0, alpha=0.5)
    ours.set_progress_bar_config(disable=True)
    seen = []

    def on_step(p, i, t, kw):
        seen.append(int(t))
        return kw

    latents = torch.randn(4, LATENT, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    a = _call(ours, latents=latents, callback_on_step_end=on_step)
    assert len(seen) == 3 and ours.trace.gate.shape == (3, 4)
    ours.save_pretrained(tmp_path / "sd", safe_serialization=True)
    assert (tmp_path / "sd" / "protector" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = StableDiffusionCPSamplePipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    b = _call(loaded, latents=latents)
    assert (a - b).abs().max().item() <= 1e-5


def test_sd_bad_input():
    pipe = tiny_sd_pipe()
    with pytest.raises(ValueError, match="in_channels=3"):
        StableDiffusionCPSamplePipeline.from_pipe(
            pipe, protector=ProtectorNet(in_channels=3, resolution=SIZE), scale=1, alpha=0.1
        )
    ours = StableDiffusionCPSamplePipeline.from_pipe(
        pipe, protector=ProtectorNet(in_channels=LATENT, resolution=SIZE), scale=1, alpha=0.1
    )
    with pytest.raises(ValueError, match="resolution=16"):
        _call(ours, height=64, width=64)
    with pytest.raises(ValueError, match="has no"):
        StableDiffusionCPSamplePipeline.from_pipe(object(), protector=None, scale=0, alpha=0.1)
    with pytest.raises(ValueError, match="generators"):  # diffusers' own batch check
        _call(ours, generator=[torch.Generator()])
    with pytest.raises(ValueError, match=r"latents has 3 samples, but 2 prompt\(s\)"):
        _call(ours, latents=torch.zeros(3, LATENT, SIZE, SIZE))
