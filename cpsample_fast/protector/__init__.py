"""The protector (docs/ALGORITHM.md §2): a time-conditioned classifier that memorises random member
labels."""

from .checkpoint import load_protector, save_protector
from .config import ProtectorTrainConfig
from .labels import VerifyResult, dataset_fingerprint, draw_labels, verify_protector
from .model import ProtectorNet
from .report import ProtectorReport, evaluate_protector
from .train import train_protector

__all__ = [
    "ProtectorNet",
    "ProtectorReport",
    "ProtectorTrainConfig",
    "VerifyResult",
    "dataset_fingerprint",
    "draw_labels",
    "evaluate_protector",
    "load_protector",
    "save_protector",
    "train_protector",
    "verify_protector",
]
