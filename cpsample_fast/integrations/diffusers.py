"""Sample protected from diffusers models: wrap a UNet, convert its scheduler, load local dirs.

diffusers is an optional dependency, imported only when these functions run. Nothing is ever
downloaded: directories are loaded with ``local_files_only=True`` and safetensors weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..schedule import NoiseSchedule


def _require_diffusers():
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs diffusers: pip install diffusers (models load from local files only)"
        ) from err
    return diffusers


class DiffusersEpsModel(nn.Module):
    """``eps_model(x, t)`` view of a diffusers ``UNet2DModel``/``UNet2DConditionModel``.

    A learned-variance UNet (``out_channels = 2C``, e.g. improved-DDPM checkpoints) returns
    the mean prediction and the variance channels; only the first ``C`` (the model's ε, v or x0
    prediction) are returned.

    Args:
        unet: the diffusers UNet; its dtype and memory format are kept (the sampler feeds it
            inputs in its own dtype).
        **call_kwargs: extra keyword arguments for every call (e.g. ``encoder_hidden_states``
            or ``class_labels`` for a conditional UNet).
    """

    def __init__(self, unet: nn.Module, **call_kwargs):
        super().__init__()
        self.unet = unet
        self.call_kwargs = call_kwargs

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # [B,C,H,W], [B]
        out = self.unet(x, t, **self.call_kwargs)
        out = out.sample if hasattr(out, "sample") else out[0]
        if out.dim() == 4 and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned variance: keep the prediction, drop the variance
        return out


def from_pipeline(
    pipeline, *, as_ddim: bool = False, **unet_kwargs
) -> tuple[DiffusersEpsModel, NoiseSchedule]:
    """``(eps_model, schedule)`` for :class:`~cpsample_fast.CPSampler` from a diffusers pipeline.

    The UNet is frozen (``eval()``, no parameter gradients). ``CPSampler`` samples DDIM, so a
    pipeline whose scheduler is not a ``DDIMScheduler`` (``DDPMPipeline``, an Euler or
    DPM-Solver pipeline) is refused unless ``as_ddim=True`` says that DDIM with the pipeline's
    noise schedule is what you want; ``cpsample_fast.diffusers.CPSamplePipeline.from_pipe`` or
    ``ProtectedScheduler`` keep the pipeline's own sampler.

    Args:
        pipeline: a diffusers pipeline with ``.unet`` and ``.scheduler``.
        as_ddim: accept a non-DDIM scheduler and sample DDIM from its noise schedule.
        **unet_kwargs: passed to every UNet call (e.g. ``class_labels=...``).
    """
    if getattr(pipeline, "unet", None) is None or getattr(pipeline, "scheduler", None) is None:
        raise TypeError(
            "pipeline must have .unet and .scheduler (e.g. DDPMPipeline, DDIMPipeline), "
            f"got {type(pipeline).__name__}"
        )
    scheduler = getattr(pipeline.scheduler, "inner", pipeline.scheduler)
    name = type(scheduler).__name__
    if name != "DDIMScheduler" and not as_ddim:
        raise ValueError(
            f"pipeline.scheduler is a {name}, but CPSampler samples DDIM: use "
            "cpsample_fast.diffusers.CPSamplePipeline.from_pipe(pipeline, protector=...) to "
            f"sample with the {name} step, or from_pipeline(pipeline, as_ddim=True) to sample "
            "DDIM from its noise schedule"
        )
    unet = pipeline.unet
    unet.eval().requires_grad_(False)
    return DiffusersEpsModel(unet, **unet_kwargs), NoiseSchedule.from_diffusers(scheduler)


def load_diffusers(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None
) -> tuple[DiffusersEpsModel, NoiseSchedule]:
    """Load ``(eps_model, schedule)`` from a local diffusers directory (never downloads).

    Accepts a pipeline directory (``unet/`` and ``scheduler/`` inside) or a UNet directory with
    a ``scheduler_config.json`` beside its ``config.json``.

    Args:
        path: the directory.
        dtype: optional dtype for the UNet (e.g. ``torch.bfloat16``).
        device: optional device for the UNet.
    """
    diffusers = _require_diffusers()
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"path must be a local diffusers directory, got {str(path)!r}")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"no UNet config.json under {str(root)!r} (or its unet/ folder)")
    sched_file = next(
        (
            p
            for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json")
            if p.is_file()
        ),
        None,
    )
    if sched_file is None:
        raise FileNotFoundError(
            f"no scheduler/scheduler_config.json under {str(root)!r}: CPSample needs the "
            "training noise schedule"
        )
    import json

    config = json.loads(sched_file.read_text())
    unet_cls_name = json.loads((unet_dir / "config.json").read_text()).get(
        "_class_name", "UNet2DModel"
    )
    unet_cls = getattr(diffusers, unet_cls_name, None)
    if unet_cls is None:
        raise ValueError(f"unknown UNet class {unet_cls_name!r} in {unet_dir / 'config.json'}")
    unet = unet_cls.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True)
    unet.eval().requires_grad_(False)
    if dtype is not None or device is not None:
        unet = unet.to(device=device, dtype=dtype)
    return DiffusersEpsModel(unet), NoiseSchedule.from_diffusers(config)
