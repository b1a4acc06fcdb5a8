"""Protector checkpoints: ``save_protector`` / ``load_protector`` (safetensors + JSON sidecar),
and the resumable training state of ``train_protector`` (``save_train_state`` /
``load_train_state``).

The sidecar ties the weights to the labels, the training-set fingerprint and the settings
(docs/ALGORITHM.md §2); every file is written atomically and pickle is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from ..resume import check_identity, load_optimizer_state, optimizer_state
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


# ----------------------------------------------------------------- resumable training state
# ``train_protector(checkpoint_dir=...)`` keeps one ``train_state-NNNNNNNNN.safetensors``
# (weights ``model.*``, optimiser ``optim.*``, generator ``rng.train``) and a JSON pointer
# ``train_state.json`` naming it, with the run's identity and progress; the pointer is written
# last, so it always names a complete file.

TRAIN_STATE_FORMAT = "cpsample_fast.protector-train-state/1"
_STATE_JSON = "train_state.json"
# The only file names a train_state.json pointer may name (same folder, no path parts).
_WEIGHTS_RE = re.compile(r"train_state-\d{9}\.safetensors")


def save_train_state(
    ckpt_dir: Path,
    step: int,
    protector: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    identity: dict,
    progress: dict,
) -> None:
    """Weights + optimiser + RNG at ``step``; the JSON pointer is written last (the commit)."""
    opt_tensors, opt_rest = optimizer_state(opt)
    tensors = {f"model.{k}": v for k, v in protector.state_dict().items()}
    tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
    tensors["rng.train"] = gen.get_state()
    name = f"train_state-{step:09d}.safetensors"
    save_safetensors_atomic(ckpt_dir / name, tensors)
    write_json_atomic(
        ckpt_dir / _STATE_JSON,
        {
            "format": TRAIN_STATE_FORMAT,
            "step": step,
            "weights": name,
            "identity": identity,
            "optimizer": opt_rest,
            "progress": progress,
        },
    )
    # Older states are found by listing the folder, never by reading a path from the pointer
    # (a tampered pointer must not be able to delete anything, least of all outside it).
    for p in ckpt_dir.iterdir():
        if p.name != name and _WEIGHTS_RE.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)


def load_train_state(
    ckpt_dir: Path,
    identity: dict,
    protector: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> dict | None:
    """Restore the latest state in ``ckpt_dir`` into ``protector``, ``opt`` and ``gen``.

    Returns:
        The pointer (``step``, ``progress``, ...), or ``None`` when there is no state.

    Raises:
        ValueError: a state of a different run (naming the differing settings), a pointer that
            names anything but a weights file in its own folder, an unreadable weights file.
    """
    pointer = ckpt_dir / _STATE_JSON
    if not pointer.is_file():
        return None
    state = read_json(pointer)
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise ValueError(f"{str(pointer)!r} is not a protector training state")
    check_identity(
        state["identity"],
        identity,
        where=f"checkpoint_dir {str(ckpt_dir)!r}",
        retry="checkpoint_dir",
    )
    name = state.get("weights")
    if not isinstance(name, str) or not _WEIGHTS_RE.fullmatch(name):
        raise ValueError(
            f"{str(pointer)!r} names weights {name!r}, not a train_state-NNNNNNNNN.safetensors "
            "file in its own folder; refusing (the pointer was modified)"
        )
    try:
        tensors = load_safetensors(ckpt_dir / name)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(
            f"training state {str(ckpt_dir / name)!r} is unreadable ({exc}); pass resume=False "
            "to start over"
        ) from None
    device = next(iter(protector.parameters()), torch.empty(0)).device
    protector.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optim = {k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("optim.")}
    load_optimizer_state(opt, optim, state["optimizer"])
    gen.set_state(tensors["rng.train"])
    return state
