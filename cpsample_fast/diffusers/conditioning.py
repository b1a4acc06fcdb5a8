"""Per-sample conditioning for the fast sampler: class labels and prompts (with CFG), VAE decode.

``cpsample sample --prompt ... --guidance-scale G`` and ``--class-labels ...`` use these: sample
``i`` (its global index, so sharded runs under torchrun match one-process runs) gets
``labels[i % len(labels)]`` / ``prompts[i % len(prompts)]``; each batch sets its slice on the
eps-model before :meth:`CPSampler.sample`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def cycle_slice(values, start: int, size: int) -> list:
    """``values[i % len(values)]`` for the global sample indices ``start … start+size-1``."""
    return [values[(start + i) % len(values)] for i in range(size)]


class CFGEpsModel(nn.Module):
    """``eps(x, t)`` of a ``UNet2DConditionModel`` with classifier-free guidance.

    As ``StableDiffusionPipeline``: with ``guidance_scale > 1`` the UNet runs on
    ``[x, x]`` with ``[uncond, cond]`` text embeddings and returns
    ``u + guidance_scale·(c − u)``; otherwise the conditional prediction alone.
    """

    def __init__(self, unet, guidance_scale: float = 7.5):
        super().__init__()
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.unet = unet
        self.guidance_scale = float(guidance_scale)
        self.cond = None
        self.uncond = None

    def set_condition(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> None:
        """Text embeddings ``[B, L, D]`` for the next batch (``uncond`` needed for CFG)."""
        p = next(self.unet.parameters())
        self.cond = cond.to(device=p.device, dtype=p.dtype)
        self.uncond = None if uncond is None else uncond.to(device=p.device, dtype=p.dtype)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cond is None or self.cond.shape[0] != x.shape[0]:
            raise ValueError(
                f"set_condition with {x.shape[0]} prompts' embeddings before sampling "
                f"(have {None if self.cond is None else self.cond.shape[0]})"
            )
        if not self.do_cfg:
            return self.unet(x, t, encoder_hidden_states=self.cond).sample
        if self.uncond is None:
            raise ValueError("guidance_scale > 1 needs the unconditional embeddings")
        out = self.unet(
            torch.cat([x, x]),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([self.uncond, self.cond]),
        ).sample
        u, c = out.chunk(2)
        return u + self.guidance_scale * (c - u)


class TextToImage:
    """The pieces of a local Stable Diffusion directory the fast sampler needs.

    Attributes:
        eps_model: a :class:`CFGEpsModel`.
        schedule: the pipeline's noise schedule (``NoiseSchedule``).
        scaling_factor: the VAE's latent scaling factor.
    """

    def __init__(self, path, *, device, guidance_scale: float = 7.5, dtype=None):
        from ..integrations.diffusers import _require_diffusers
        from ..io import read_json
        from ..schedule import NoiseSchedule

        diffusers = _require_diffusers()
        try:
            import transformers
        except ImportError as err:  # pragma: no cover - environment
            raise ImportError("--prompt needs transformers: pip install transformers") from err
        root = Path(path)
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(
                    f"{str(root)!r} has no {sub}/: --prompt needs a Stable Diffusion style "
                    "pipeline directory (unet, vae, text_encoder, tokenizer, scheduler)"
                )
        kw = dict(local_files_only=True, use_safetensors=True)
        unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet", **kw)
        self.vae = diffusers.AutoencoderKL.from_pretrained(root / "vae", **kw)
        self.text_encoder = transformers.CLIPTextModel.from_pretrained(root / "text_encoder", **kw)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            root / "tokenizer", local_files_only=True
        )
        for m in (unet, self.vae, self.text_encoder):
            m.eval().requires_grad_(False).to(device=device, dtype=dtype)
        self.device = torch.device(device)
        self.eps_model = CFGEpsModel(unet, guidance_scale)
        self.schedule = NoiseSchedule.from_diffusers(
            read_json(root / "scheduler" / "scheduler_config.json")
        )
        self.scaling_factor = float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text embeddings ``[B, L, D]`` as ``StableDiffusionPipeline.encode_prompt``."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def set_prompts(self, prompts: list[str], negative: list[str] | None = None) -> None:
        uncond = None
        if self.eps_model.do_cfg:
            uncond = self.encode(negative if negative is not None else [""] * len(prompts))
        self.eps_model.set_condition(self.encode(prompts), uncond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents (``vae.decode(latents / scaling_factor)``)."""
        p = next(self.vae.parameters())
        img = self.vae.decode(latents.to(p.device, p.dtype) / self.scaling_factor).sample
        return img.float().clamp(-1, 1)
