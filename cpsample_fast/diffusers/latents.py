"""Encode training images through a pipeline's VAE once, for latent protectors.

A protector for a latent diffusion model must see what the UNet sees: the VAE's latents times
its ``scaling_factor`` (docs/ALGORITHM.md §2: the protector is trained in the DDPM
parametrisation of the diffused samples). :func:`encode_latents` computes them in batches and
caches them in a safetensors file keyed by the images' fingerprint and the VAE's config, so a
second call (or a second ``cpsample train-protector --vae DIR`` run) skips the encoder.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..data import as_image_tensor
from ..io import load_safetensors, safetensors_metadata, save_safetensors_atomic
from ..protector.labels import dataset_fingerprint


def _vae_key(vae, scaling_factor: float, use_mean: bool) -> str:
    config = dict(getattr(vae, "config", {}) or {})
    text = json.dumps(
        {"config": config, "scaling_factor": scaling_factor, "mean": use_mean},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


@torch.no_grad()
def encode_latents(
    vae,
    images,
    *,
    scaling_factor: float | None = None,
    batch_size: int = 16,
    sample: bool = False,
    generator: torch.Generator | None = None,
    cache: str | os.PathLike | None = None,
    device=None,
    progress: bool = False,
) -> torch.Tensor:
    """Latents ``vae.encode(x).latent_dist × scaling_factor`` of images in [-1, 1].

    Args:
        vae: a diffusers ``AutoencoderKL`` (or any module whose ``encode(x)`` returns an object
            with ``latent_dist``).
        images: ``[N, C, H, W]`` in [-1, 1] (or a Dataset of ``[C, H, W]``).
        scaling_factor: default ``vae.config.scaling_factor``.
        batch_size: images per encoder call.
        sample: draw from ``latent_dist`` (with ``generator``) instead of taking its mean.
        generator: for ``sample=True``.
        cache: a ``.safetensors`` path: reused when it holds the latents of these images under
            this VAE and these settings, written (atomically) otherwise.
        device: where to run the encoder (default: the VAE's device).
        progress: tqdm bar over the batches.

    Returns:
        float32 ``[N, C_latent, H/f, W/f]`` on the CPU.
    """
    x = as_image_tensor(images, "images")
    if scaling_factor is None:
        scaling_factor = getattr(getattr(vae, "config", None), "scaling_factor", None)
        if scaling_factor is None:
            raise ValueError("scaling_factor: the VAE's config has none; pass scaling_factor=")
    scaling_factor = float(scaling_factor)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fingerprint = dataset_fingerprint(x)["sha256"]
    key = _vae_key(vae, scaling_factor, not sample)
    if cache is not None and os.path.isfile(cache):
        meta = safetensors_metadata(cache)
        if meta.get("images_sha256") == fingerprint and meta.get("vae_key") == key and not sample:
            return load_safetensors(cache)["latents"]
    if device is None:
        device = next(vae.parameters()).device if isinstance(vae, torch.nn.Module) else "cpu"
    dtype = next(vae.parameters()).dtype if isinstance(vae, torch.nn.Module) else torch.float32
    batches = range(0, x.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="encode")
    out = []
    for i in batches:
        dist = vae.encode(x[i : i + batch_size].to(device=device, dtype=dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        out.append(z.float().cpu() * scaling_factor)
    latents = torch.cat(out)
    if cache is not None and not sample:
        save_safetensors_atomic(
            cache,
            {"latents": latents},
            {"images_sha256": fingerprint, "vae_key": key, "scaling_factor": str(scaling_factor)},
        )
    return latents
