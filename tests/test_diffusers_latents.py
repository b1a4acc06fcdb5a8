"""Latent protectors: VAE encoding once (cached), latent-mode training, train-protector --vae."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from cpsample_fast.cli import train_protector as cli  # noqa: E402
from cpsample_fast.diffusers import encode_latents  # noqa: E402
from cpsample_fast.protector import train_protector  # noqa: E402
from cpsample_fast.schedule import NoiseSchedule  # noqa: E402


def tiny_vae(channels=1):
    torch.manual_seed(0)
    return (
        diffusers.AutoencoderKL(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=16,
        )
        .eval()
        .requires_grad_(False)
    )


def test_encode_latents_is_the_scaled_mean_and_is_cached(tmp_path):
    vae = tiny_vae()
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    cache = tmp_path / "lat.safetensors"
    z = encode_latents(vae, x, batch_size=2, cache=cache)
    want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert z.shape == (5, 4, 8, 8)
    assert torch.allclose(z, want, atol=1e-6)
    assert cache.is_file()

    class NoEncoder(torch.nn.Module):  # the cache answers: the encoder is never called
        config = vae.config

        def encode(self, x):
            raise AssertionError("encoder called despite a valid cache")

    assert torch.equal(encode_latents(NoEncoder(), x, cache=cache), z)
    # other images (or another VAE config) re-encode
    z2 = encode_latents(vae, x.flip(0), cache=cache)
    assert torch.allclose(z2, z.flip(0), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        encode_latents(vae, x * 3)


def test_train_protector_latent_mode_accepts_any_range():
    z = 3.0 * torch.randn(8, 4, 8, 8)
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_protector(z, schedule=schedule, steps=2, progress=False)
    net, report = train_protector(
        z,
        schedule=schedule,
        protector={"base_channels": 8},
        steps=2,
        batch_size=4,
        progress=False,
        latent=True,
    )
    assert net.in_channels == 4 and net.resolution == 8
    assert report.training["settings"]["latent"] is True
    with pytest.raises(ValueError, match="NaN"):
        train_protector(z * float("nan"), schedule=schedule, steps=2, latent=True)


def test_cli_train_protector_with_vae(tmp_path):
    pipe_dir = tmp_path / "pipe"
    tiny_vae().save_pretrained(pipe_dir / "vae", safe_serialization=True)
    diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).save_pretrained(pipe_dir / "scheduler")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "out"
    argv = ["--data", "digits", "--n", "6", "--size", "16", "--steps", "3", "--batch-size", "4"]
    argv += ["--width", "8", "--vae", str(pipe_dir), "--no-progress", "--out", str(out)]
    assert cli.main(parser.parse_args(argv)) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["latent"] and result["schedule"]["beta_schedule"] == "scaled_linear"
    assert (out / "latents.safetensors").is_file()
    meta = json.loads((out / "protector.json").read_text())
    assert meta["fingerprint"]["shape"] == [4, 8, 8]
    # a second run reuses the cached latents and resumes the finished training
    assert cli.main(parser.parse_args(argv)) == 0
    bad = ["--data", "digits", "--n", "6", "--vae", str(tmp_path / "nope"), "--out", str(out)]
    with pytest.raises(FileNotFoundError, match="--vae: no config.json"):  # cli/__main__: exit 2
        cli.main(parser.parse_args(bad))
