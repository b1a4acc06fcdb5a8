"""Protector checkpoints: ``save_protector`` / ``load_protector`` (safetensors + JSON sidecar).

The sidecar ties the weights to the labels, the training-set fingerprint and the settings
(docs/ALGORITHM.md §2); every file is written atomically and pickle is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..io import (
    ensure_writable_dir,
    load_safetensors,
    read_json,
    refuse_pickle,
    safetensors_metadata,
    save_safetensors_atomic,
    write_json_atomic,
)
from .model import ProtectorNet
from .report import ProtectorReport

CHECKPOINT_FORMAT = "cpsample_fast.protector/1"


def _canonical_sha256(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights.safetensors, weights.json)`` for a file path or a folder."""
    p = refuse_pickle(path)
    if p.is_dir() or (not p.suffix and not p.exists()):
        p = p / "protector.safetensors"
    if p.suffix != ".safetensors":
        raise ValueError(f"protector checkpoints end in .safetensors, got {str(p)!r}")
    return p, p.with_suffix(".json")


def _identity(meta: Mapping[str, Any]) -> dict:
    """The fields that must agree between weights and sidecar."""
    return {k: meta[k] for k in ("architecture", "label_seed", "labels", "fingerprint")}


def save_protector(path: str | os.PathLike, protector: nn.Module, report: ProtectorReport) -> Path:
    """Write ``path`` (safetensors weights) and its ``.json`` sidecar, each atomically.

    The sidecar holds the architecture config, schedule config, label seed, labels,
    fingerprint, training settings, the report and the package version, plus checksums tying
    it to the weights: ``load_protector`` refuses a sidecar that was edited or that belongs to
    other weights.

    Args:
        path: ``*.safetensors`` file, or a folder (``protector.safetensors`` inside).
        protector: The trained module.
        report: Its :class:`ProtectorReport`.

    Returns:
        The weights path.
    """
    if not isinstance(protector, nn.Module):
        raise TypeError(f"protector must be an nn.Module, got {type(protector).__name__}")
    if not isinstance(report, ProtectorReport):
        raise TypeError(f"report must be a ProtectorReport, got {type(report).__name__}")
    weights, sidecar = _checkpoint_paths(path)
    ensure_writable_dir(weights.parent, "checkpoint folder")
    config = getattr(protector, "config", None)
    is_default = isinstance(protector, ProtectorNet)
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "package_version": __version__,
        "architecture": {
            "class": "ProtectorNet" if is_default else type(protector).__qualname__,
            "config": dict(config) if is_default else None,
        },
        "schedule": report.training.get("schedule"),
        "label_seed": int(report.label_seed),
        "labels": [int(v) for v in report.labels.tolist()],
        "fingerprint": dict(report.fingerprint),
        "training": {k: v for k, v in report.training.items() if k != "schedule"},
        "report": report.to_dict(),
    }
    meta_hash = _canonical_sha256(_identity(meta))
    save_safetensors_atomic(
        weights,
        protector.state_dict(),
        metadata={"format": CHECKPOINT_FORMAT, "meta_sha256": meta_hash},
    )
    meta["meta_sha256"] = meta_hash
    meta["weights_sha256"] = _file_sha256(weights)
    meta["sidecar_sha256"] = _canonical_sha256(meta)
    write_json_atomic(sidecar, meta)
    return weights


def load_protector(
    path: str | os.PathLike,
    *,
    protector: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Read a protector written by :func:`save_protector`.

    Args:
        path: The ``.safetensors`` file or its folder. Pickle files are refused.
        protector: Module to load the weights into (needed for custom architectures; default:
            rebuild ``ProtectorNet`` from the sidecar's config).
        device: Where to put the weights.

    Returns:
        ``(protector, meta)``: the module in eval mode and the sidecar dictionary (labels,
        fingerprint, schedule config, report, ...; ``meta["labels"]`` is a list of ints).

    Raises:
        ValueError: pickle file, edited sidecar, or weights and sidecar that do not belong
            together. FileNotFoundError: missing file.
    """
    weights, sidecar = _checkpoint_paths(path)
    if not weights.is_file():
        raise FileNotFoundError(f"no protector weights at {str(weights)!r}")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"no sidecar {str(sidecar)!r}: a protector is unusable without its labels and "
            "fingerprint"
        )
    meta = read_json(sidecar)
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(sidecar)!r} is not a cpsample_fast protector sidecar")
    claimed = meta.pop("sidecar_sha256", None)
    if claimed != _canonical_sha256(meta):
        raise ValueError(f"sidecar {str(sidecar)!r} was modified after it was written; refusing")
    meta["sidecar_sha256"] = claimed
    if meta.get("weights_sha256") != _file_sha256(weights):
        raise ValueError(
            f"weights {str(weights)!r} do not match their sidecar (different or modified file)"
        )
    header = safetensors_metadata(weights)
    if header.get("meta_sha256") != meta.get("meta_sha256") or meta.get(
        "meta_sha256"
    ) != _canonical_sha256(_identity(meta)):
        raise ValueError(f"sidecar {str(sidecar)!r} belongs to other weights; refusing")
    arch = meta["architecture"]
    if protector is None:
        if arch["class"] != "ProtectorNet" or arch["config"] is None:
            raise ValueError(
                f"checkpoint holds a custom protector ({arch['class']}); pass protector= an "
                "instance of that class to load the weights into"
            )
        protector = ProtectorNet.from_config(arch["config"])
    state = load_safetensors(weights, device="cpu")
    protector.load_state_dict(state, strict=True)
    return protector.to(device).eval(), meta
