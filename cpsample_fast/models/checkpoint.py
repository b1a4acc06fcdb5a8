"""ε-model checkpoints: ``save_checkpoint`` / ``load_checkpoint`` / ``load_unet``.

One safetensors file per checkpoint (weights, optimiser, RNG state and metadata in its header,
written by one atomic rename) plus a readable ``.json`` copy; a checksum of the tensor contents
makes a corrupted file refused instead of sampled from.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..io import (
    load_safetensors,
    read_json,
    refuse_pickle,
    safetensors_metadata,
    save_safetensors_atomic,
    write_json_atomic,
)

# Header key of the safetensors file holding the JSON metadata: the weights, optimiser, RNG
# state and ``step`` then live in one file written by one atomic rename, so a run killed at any
# moment leaves either the old or the new checkpoint, never weights of one step with the
# ``step`` of another. The ``.json`` sidecar is a readable copy written afterwards.
_META_KEY = "cpsample_fast.meta"
# Header key of the checksum of the tensor contents (names, dtypes, shapes, bytes): a flipped
# bit in the weights makes ``load_checkpoint`` refuse the file instead of sampling from it.
_SHA_KEY = "cpsample_fast.tensors_sha256"


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """safetensors (with ``meta`` in its header) then a JSON sidecar copy, each atomic.

    The safetensors rename is the commit: :func:`load_checkpoint` reads ``meta`` from the header,
    so a kill before the sidecar is replaced leaves a stale sidecar but a consistent checkpoint.
    """
    from ..shards import content_sha256

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, sort_keys=True, allow_nan=False)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {_META_KEY: text, _SHA_KEY: content_sha256(tensors)}
    save_safetensors_atomic(path, tensors, metadata=header)
    write_json_atomic(path.with_suffix(".json"), meta)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict, **extra) -> None:
    """Write ``model``'s weights as safetensors (prefix ``model.``) and ``meta`` as JSON beside.

    Args:
        path: ``.safetensors`` file; the sidecar is the same name with ``.json``.
        model: weights to store.
        meta: JSON-able metadata (model config, schedule, data fingerprint, ...); stored in the
            safetensors header (authoritative) and copied to the sidecar.
        **extra: more tensors dicts, stored under their keyword as prefix (e.g. ``ema=...``,
            ``opt=...``).
    """
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    for prefix, d in extra.items():
        tensors.update({f"{prefix}.{k}": v.detach().cpu() for k, v in d.items()})
    _atomic_save(tensors, meta, Path(path))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(groups, meta)``: tensors grouped by prefix (``groups["model"]`` is a state dict) and
        the metadata: from the safetensors header when it carries it (written in the same
        atomic rename as the tensors), else from the JSON sidecar (older files).

    Raises:
        ValueError: the file is unreadable (e.g. truncated), or its tensors do not match the
            checksum in its header (a corrupted or modified file). A file without a checksum
            (written before checksums existed) loads with a warning.
    """
    from ..shards import content_sha256

    path = refuse_pickle(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        flat = load_safetensors(path)
        header = safetensors_metadata(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt): {exc}") from None
    if _SHA_KEY in header:
        if content_sha256(flat) != header[_SHA_KEY]:
            raise ValueError(
                f"checkpoint {path} is corrupt: its tensors do not match the checksum in its "
                "header; restore it from a good copy"
            )
    else:
        warnings.warn(
            f"checkpoint {path} has no content checksum (an old file), so it cannot be verified; "
            "save it again with cpsample_fast.models.save_checkpoint to add one",
            stacklevel=2,
        )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        prefix, _, name = k.partition(".")
        groups.setdefault(prefix, {})[name] = v
    if _META_KEY in header:
        meta = json.loads(header[_META_KEY])
    else:
        side = path.with_suffix(".json")
        meta = read_json(side) if side.exists() else {}
    return groups, meta


def load_unet(path: str | os.PathLike):
    """A :class:`~cpsample_fast.models.unet.SmallUNet` from a :func:`save_checkpoint` file.

    Returns:
        ``(model, meta)``: the UNet in eval mode (float32, no gradients) and the metadata, which
        must hold ``unet_config`` (and normally ``schedule``).
    """
    from .unet import SmallUNet, UNetConfig

    groups, meta = load_checkpoint(path)
    if "unet_config" not in meta:
        raise ValueError(
            f"{path}: its metadata must hold 'unet_config' (written by "
            "cpsample_fast.models.save_checkpoint with the model's config)"
        )
    model = SmallUNet(UNetConfig.from_dict(meta["unet_config"]))
    model.load_state_dict({k: v.float() for k, v in groups["model"].items()})
    return model.eval().requires_grad_(False), meta
