"""Load an ε-model from what a user names on the command line, and read its sample shape.

``load_eps_model`` accepts a local diffusers directory, a package UNet checkpoint
(``.safetensors`` with its ``.json`` sidecar, holding the training ``schedule``) or ``'digits'``
(the shipped memorising digits UNet); ``sample_shape`` reads ``(C, H, W)`` from the model's
config, for the package UNet and for diffusers UNets alike.
"""

from __future__ import annotations

from pathlib import Path


def load_eps_model(spec: str, device):
    """``(eps_model, schedule)`` from a diffusers dir, a package UNet checkpoint or 'digits'.

    Raises:
        ValueError: naming ``--model`` when ``spec`` is none of those, or a checkpoint lacks
            its training schedule.
    """
    from ..schedule import NoiseSchedule

    path = Path(spec)
    if spec == "digits":
        from .digits import load_digits_unet

        model, meta = load_digits_unet()
        return model.to(device), NoiseSchedule.from_config(meta["schedule"])
    if path.is_dir():
        from ..integrations.diffusers import load_diffusers

        return load_diffusers(path, device=device)
    if path.suffix == ".safetensors":
        from .checkpoint import load_unet

        model, meta = load_unet(path)
        if "schedule" not in meta:
            raise ValueError(f"{path}: its metadata must hold the training 'schedule'")
        return model.to(device), NoiseSchedule.from_config(meta["schedule"])
    raise ValueError(
        f"--model must be a diffusers directory, a .safetensors UNet checkpoint or 'digits', "
        f"got {spec!r}"
    )


def sample_shape(eps_model) -> tuple[int, int, int]:
    """``(C, H, W)`` from the model's config (package UNet or diffusers UNet).

    Raises:
        ValueError: when the config does not tell the channels and the size.
    """
    cfg = getattr(eps_model, "config", None)
    unet = getattr(eps_model, "unet", None)
    if unet is not None:
        cfg = unet.config
    if cfg is not None:
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        c = get("in_channels") or get("channels")
        s = get("sample_size") or get("resolution") or get("image_size")
        if c and s:
            s = s if isinstance(s, (tuple, list)) else (s, s)
            return int(c), int(s[0]), int(s[1])
    raise ValueError("cannot tell the sample shape (C, H, W) from the model's config")
