"""``StableDiffusionCPSamplePipeline``: text-to-image with classifier-free guidance, protected.

``StableDiffusionCPSamplePipeline.from_pipe(sd_pipe, protector=..., scale=..., alpha=...)``
shares ``sd_pipe``'s components. A call is ``StableDiffusionPipeline.__call__`` (``prompt``,
``negative_prompt``, ``guidance_scale``, ``num_inference_steps``, ``num_images_per_prompt``,
``generator``, ``latents``, ``output_type``, ``callback_on_step_end``, …) with the scheduler
wrapped in :class:`~cpsample_fast.diffusers.ProtectedScheduler` for the call: the protector acts
on the latents the UNet sees, after classifier-free guidance has combined the two predictions
(docs/ALGORITHM.md §3 with the CFG output as the model output). The registered scheduler stays
the plain diffusers one, so ``save_pretrained`` writes a normal Stable Diffusion directory plus
the protector.

This module imports diffusers (and transformers through it).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor

from ..protector.model import ProtectorNet
from .component import ModuleProtector, ProtectorComponent
from .pipeline import _unwrap, check_protector_fits
from .scheduler import ProtectedScheduler, check_scheduler

_COMPONENTS = (
    "vae",
    "text_encoder",
    "tokenizer",
    "unet",
    "scheduler",
    "safety_checker",
    "feature_extractor",
    "image_encoder",
)


class StableDiffusionCPSamplePipeline(StableDiffusionPipeline):
    """Stable Diffusion with CPSample guidance on the latents (see the module docstring).

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
            image_encoder, requires_safety_checker: as ``StableDiffusionPipeline``.
        protector: a latent protector (trained on latents × the VAE's scaling factor, e.g. with
            ``cpsample train-protector --vae DIR``).
        scale, alpha, mode, guidance_range: as :class:`ProtectedScheduler`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->protector->unet->vae"
    _optional_components = [*StableDiffusionPipeline._optional_components, "protector"]
    _exclude_from_cpu_offload = ["safety_checker"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
        protector=None,
        *,
        scale: float = 0.0,
        alpha: float = 0.5,
        mode: str = "repel",
        guidance_range=None,
    ):
        scheduler = _unwrap(scheduler)
        check_scheduler(scheduler)
        # StableDiffusionPipeline.__init__ minus its in-place "fixes" of the scheduler/UNet
        # configs: from_pipe shares the source pipeline's objects and must not change its sampler
        DiffusionPipeline.__init__(self)
        self._is_unet_config_sample_size_int = isinstance(unet.config.sample_size, int)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        if isinstance(protector, ProtectorNet):
            protector = ProtectorComponent.from_protector(protector)
        elif isinstance(protector, torch.nn.Module) and not hasattr(protector, "device"):
            protector = ModuleProtector(protector)
        if isinstance(protector, ProtectorComponent):
            protector.eval().requires_grad_(False)
        if protector is not None:
            check_protector_fits(protector, unet.config.in_channels, unet.config.sample_size)
        self.register_modules(protector=protector)
        self.register_to_config(
            scale=float(scale),
            alpha=float(alpha),
            mode=mode,
            guidance_range=None if guidance_range is None else list(guidance_range),
        )
        self.trace = None
        self._protected(scheduler)  # validate the guidance settings now

    @classmethod
    def from_pipe(
        cls, pipe, *, protector, scale: float, alpha: float, mode="repel", guidance_range=None
    ):
        """A protected pipeline sharing ``pipe``'s components (nothing is copied)."""
        missing = [k for k in ("unet", "vae", "text_encoder", "tokenizer") if not hasattr(pipe, k)]
        if missing:
            raise ValueError(
                f"pipe: {type(pipe).__name__} has no {', '.join(missing)}; "
                "StableDiffusionCPSamplePipeline needs a Stable Diffusion style pipeline"
            )
        if type(pipe.unet).__name__ != "UNet2DConditionModel":
            raise ValueError(
                f"pipe.unet is a {type(pipe.unet).__name__}, expected UNet2DConditionModel "
                "(use CPSamplePipeline for UNet2DModel pipelines)"
            )
        parts = {k: getattr(pipe, k, None) for k in _COMPONENTS}
        return cls(
            **parts,
            requires_safety_checker=False,
            protector=protector,
            scale=scale,
            alpha=alpha,
            mode=mode,
            guidance_range=guidance_range,
        )

    def _protected(self, scheduler) -> ProtectedScheduler:
        return ProtectedScheduler(
            scheduler,
            self.protector,
            scale=self.config.scale,
            alpha=self.config.alpha,
            mode=self.config.mode,
            guidance_range=self.config.guidance_range,
        )

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """``StableDiffusionPipeline.__call__``, protected; ``self.trace`` afterwards holds the
        per-step gate and confidence."""
        if self.protector is not None:
            vsf = self.vae_scale_factor
            size = self.unet.config.sample_size
            h = kwargs.get("height") or size * vsf
            w = kwargs.get("width") or size * vsf
            check_protector_fits(self.protector, self.unet.config.in_channels, (h // vsf, w // vsf))
        _check_batch(args, kwargs)
        inner = self.scheduler
        wrapped = self._protected(inner)
        object.__setattr__(self, "scheduler", wrapped)  # for this call only; config untouched
        try:
            out = super().__call__(*args, **kwargs)
        finally:
            object.__setattr__(self, "scheduler", inner)
        self.trace = wrapped.trace
        return out


def _check_batch(args, kwargs) -> None:
    """Prompts × images per prompt must match given latents (clear error before sampling)."""
    prompt = args[0] if args else kwargs.get("prompt")
    latents = kwargs.get("latents")
    if latents is None:
        return
    if isinstance(prompt, str):
        n = 1
    elif isinstance(prompt, (list, tuple)):
        n = len(prompt)
    elif kwargs.get("prompt_embeds") is not None:
        n = kwargs["prompt_embeds"].shape[0]
    else:
        return
    batch = n * int(kwargs.get("num_images_per_prompt") or 1)
    if latents.shape[0] != batch:
        raise ValueError(
            f"latents has {latents.shape[0]} samples, but {n} prompt(s) × "
            f"num_images_per_prompt={kwargs.get('num_images_per_prompt') or 1} make {batch}"
        )
