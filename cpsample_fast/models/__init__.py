"""ε-models for tests and the demo: the exact empirical denoiser and a small trainable UNet."""

from .checkpoint import load_checkpoint, load_unet, save_checkpoint
from .digits import digits_split, load_digits_unet
from .empirical import EmpiricalDenoiser
from .loading import load_eps_model, sample_shape
from .train import TrainReport, train_diffusion
from .unet import UNET_CONFIGS, SmallUNet, UNetConfig

__all__ = [
    "UNET_CONFIGS",
    "EmpiricalDenoiser",
    "SmallUNet",
    "TrainReport",
    "UNetConfig",
    "digits_split",
    "load_checkpoint",
    "load_digits_unet",
    "load_eps_model",
    "load_unet",
    "sample_shape",
    "save_checkpoint",
    "train_diffusion",
]
