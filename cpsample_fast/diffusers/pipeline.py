"""``CPSamplePipeline``: protected sampling for unconditional and class-conditional UNet2DModels.

``CPSamplePipeline.from_pipe(pipe, protector=..., scale=..., alpha=...)`` reuses a
``DDIMPipeline``/``DDPMPipeline``'s UNet and scheduler. Under a ``DDIMScheduler`` it runs the fast
:class:`~cpsample_fast.sampler.CPSampler` loop (fused update, optional ``torch.compile``) with
diffusers-compatible noise from ``generator``; under any other supported scheduler it drives
:class:`~cpsample_fast.diffusers.ProtectedScheduler` the way diffusers' pipelines drive a
scheduler. Scale 0 reproduces the source pipeline from the same ``generator``.

This module imports diffusers; ``cpsample_fast.diffusers`` imports it lazily.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from ..integrations.diffusers import DiffusersEpsModel
from ..protector.fit import check_protector_fits as _check_fits
from ..protector.model import ProtectorNet
from ..sampler import CPSampler
from ..schedule import NoiseSchedule
from ._noise import check_generator, randn_like_diffusers
from .component import ModuleProtector, ProtectorComponent
from .scheduler import ProtectedScheduler, check_scheduler


def _unwrap(scheduler):
    return scheduler.inner if isinstance(scheduler, ProtectedScheduler) else scheduler


def check_protector_fits(protector, channels: int, size) -> None:
    """``protector.fit.check_protector_fits`` for a UNet's samples: ``channels`` and its
    ``sample_size`` (an int, an ``(H, W)`` pair, or None when unknown)."""
    hw = (
        (None, None)
        if size is None
        else tuple(size)
        if isinstance(size, (tuple, list))
        else (size, size)
    )
    _check_fits(protector, (channels, *hw))


def _fast_path_ok(scheduler) -> bool:
    """DDIM without features the fused CPSampler step does not implement."""
    if type(scheduler).__name__ != "DDIMScheduler":
        return False
    try:
        NoiseSchedule.from_diffusers(scheduler.config)
    except (ValueError, TypeError):
        return False
    return True


def class_label_tensor(unet, class_labels, batch_size: int, device):
    """``[batch_size]`` int64 labels, checked against the UNet's class conditioning."""
    conditional = (
        unet.config.get("num_class_embeds", None) is not None
        or unet.config.get("class_embed_type", None) is not None
    )
    if class_labels is None:
        if conditional:
            raise ValueError(
                "class_labels is required: the UNet is class-conditional "
                f"(num_class_embeds={unet.config.get('num_class_embeds')})"
            )
        return None
    if not conditional:
        raise ValueError("class_labels given, but the UNet is not class-conditional")
    labels = torch.as_tensor(class_labels, device=device)
    if labels.dim() == 0:
        labels = labels.expand(batch_size)
    if labels.dim() != 1 or labels.shape[0] != batch_size:
        raise ValueError(
            f"class_labels must be one label or {batch_size} (batch_size) labels, "
            f"got shape {list(labels.shape)}"
        )
    n = unet.config.get("num_class_embeds", None)
    if n is not None and not labels.is_floating_point():
        if labels.numel() and (labels.min() < 0 or labels.max() >= n):
            raise ValueError(f"class_labels must lie in [0, {n}), got {labels.tolist()}")
    return labels


class CPSamplePipeline(DiffusionPipeline):
    """CPSample for ``UNet2DModel`` pipelines (unconditional or class-conditional).

    Args:
        unet: a diffusers ``UNet2DModel``.
        scheduler: a supported diffusers scheduler (``SUPPORTED_SCHEDULERS``).
        protector: ``protector(x_t, t) -> logits [B]`` (a ``ProtectorNet``).
        scale, alpha, mode, guidance_range: as :class:`~cpsample_fast.CPSampler`.
        compile: passed to ``CPSampler`` on the fast path.
    """

    model_cpu_offload_seq = "protector->unet"
    _optional_components = ["protector"]

    def __init__(
        self,
        unet,
        scheduler,
        protector=None,
        *,
        scale: float = 0.0,
        alpha: float = 0.5,
        mode: str = "repel",
        guidance_range=None,
        compile=False,
    ):
        super().__init__()
        scheduler = _unwrap(scheduler)
        check_scheduler(scheduler)
        if isinstance(protector, ProtectorNet):
            # a pipeline component: .to(), offloading, save_pretrained/from_pretrained
            protector = ProtectorComponent.from_protector(protector)
        elif isinstance(protector, torch.nn.Module) and not hasattr(protector, "device"):
            protector = ModuleProtector(protector)
        if isinstance(protector, ProtectorComponent):
            protector.eval().requires_grad_(False)  # from_pretrained loads it trainable
        self.register_modules(unet=unet, scheduler=scheduler, protector=protector)
        self.register_to_config(
            scale=float(scale),
            alpha=float(alpha),
            mode=mode,
            guidance_range=None if guidance_range is None else list(guidance_range),
        )
        self.scale = float(scale)
        self.alpha = float(alpha)
        self.mode = mode
        self.guidance_range = guidance_range
        self.compile = compile
        self.trace = None
        self.last_path = None  # "cpsampler" or "scheduler": which loop the last call ran
        self._samplers: dict = {}
        # validate the guidance settings now, not at the first call
        ProtectedScheduler(
            scheduler, protector, scale=self.scale, alpha=self.alpha, mode=mode,
            guidance_range=guidance_range,
        )  # fmt: skip

    @classmethod
    def from_pipe(
        cls,
        pipe,
        *,
        protector,
        scale: float,
        alpha: float,
        mode: str = "repel",
        guidance_range=None,
        compile=False,
    ):
        """A protected pipeline sharing ``pipe``'s UNet and scheduler (nothing is copied)."""
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise ValueError(
                f"pipe: {type(pipe).__name__} has no .unet; CPSamplePipeline needs a UNet2DModel "
                "pipeline (DDIMPipeline, DDPMPipeline, ...)"
            )
        if type(unet).__name__ != "UNet2DModel":
            raise ValueError(
                f"pipe.unet is a {type(unet).__name__}; CPSamplePipeline takes UNet2DModel "
                "pipelines (text-conditional UNets need a Stable Diffusion style pipeline)"
            )
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is None:
            raise ValueError(f"pipe: {type(pipe).__name__} has no .scheduler")
        if protector is not None:
            check_protector_fits(protector, unet.config.in_channels, unet.config.sample_size)
        return cls(
            unet,
            scheduler,
            protector,
            scale=scale,
            alpha=alpha,
            mode=mode,
            guidance_range=guidance_range,
            compile=compile,
        )

    def _sampler(self, n: int, eta: float, labels, clipped: bool = False):
        gr = None if self.guidance_range is None else tuple(self.guidance_range)
        key = (n, float(eta), clipped, self.scale, self.alpha, self.mode, gr, id(self.protector))
        if key not in self._samplers:
            self._samplers[key] = CPSampler(
                DiffusersEpsModel(self.unet),
                self.protector if self.scale > 0 else None,
                NoiseSchedule.from_diffusers(self.scheduler.config),
                num_inference_steps=n,
                eta=eta,
                scale=self.scale if self.scale > 0 else None,
                alpha=self.alpha if self.scale > 0 else None,
                mode=self.mode,
                guidance_range=self.guidance_range,
                compile=self.compile,
                use_clipped_model_output=clipped,
            )
        sampler = self._samplers[key]
        sampler.eps_model.call_kwargs = {} if labels is None else {"class_labels": labels}
        return sampler

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator=None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels=None,
    ):
        """Sample ``batch_size`` protected images; arguments as ``DDIMPipeline`` plus
        ``class_labels`` (one label, or one per sample). ``self.trace`` holds the per-step
        gate and confidence afterwards."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        device = self._execution_device
        size = self.unet.config.sample_size
        hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        shape = (batch_size, self.unet.config.in_channels, *hw)
        if generator is not None:
            check_generator(generator, batch_size)
        labels = class_label_tensor(self.unet, class_labels, batch_size, device)
        if self.protector is not None:
            check_protector_fits(self.protector, shape[1], hw)
        scheduler = self.scheduler

        if _fast_path_ok(scheduler):
            self.last_path = "cpsampler"
            sampler = self._sampler(
                num_inference_steps, eta, labels, bool(use_clipped_model_output)
            )
            kwargs = {"generator": generator}
            if generator is None:  # diffusers would use the global RNG: seed Philox from it
                kwargs = {"seed": int(torch.randint(0, 2**62, (1,)).item())}
            image, trace = sampler.sample(
                shape,
                device=device,
                return_trace=True,
                progress=not getattr(self, "_progress_bar_config", {}).get("disable", False),
                **kwargs,
            )
            self.trace = trace if sampler.protector is not None else None
        else:
            self.last_path = "scheduler"
            image = self._scheduler_loop(
                scheduler, shape, labels, generator, eta, num_inference_steps,
                use_clipped_model_output, device,
            )  # fmt: skip

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _scheduler_loop(self, scheduler, shape, labels, generator, eta, n, clipped, device):
        """The generic diffusers loop with a ProtectedScheduler (docs/ALGORITHM.md §3)."""
        wrapped = ProtectedScheduler(
            scheduler, self.protector, scale=self.scale, alpha=self.alpha, mode=self.mode,
            guidance_range=self.guidance_range,
        )  # fmt: skip
        if type(scheduler).__name__ == "DDPMScheduler" and eta not in (0.0, 1.0):
            warnings.warn("eta is ignored by DDPMScheduler (ancestral sampling)", stacklevel=3)
        if generator is None:
            x = torch.randn(shape, device=device, dtype=self.unet.dtype)
        else:
            x = randn_like_diffusers(shape, generator, device, self.unet.dtype)
        wrapped.set_timesteps(n, device=device)
        x = x * wrapped.init_noise_sigma
        params = inspect.signature(wrapped.step).parameters
        step_kwargs = {}
        if "eta" in params:
            step_kwargs["eta"] = eta
        if "generator" in params:
            step_kwargs["generator"] = generator
        if clipped is not None and "use_clipped_model_output" in params:
            step_kwargs["use_clipped_model_output"] = clipped
        extra = {} if labels is None else {"class_labels": labels}
        for t in self.progress_bar(wrapped.timesteps):
            inp = wrapped.scale_model_input(x, t)
            out = self.unet(inp, t, **extra).sample
            x = wrapped.step(out, t, x, **step_kwargs).prev_sample
        self.trace = wrapped.trace
        return x
