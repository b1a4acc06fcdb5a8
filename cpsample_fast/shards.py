"""Self-verifying sample shards, the output-folder lock, and streaming merges (``cpsample sample``).

A run of ``cpsample sample`` is cut into batches of global sample indices (see
:mod:`cpsample_fast.distributed`); each batch is one safetensors *shard* whose header records

- the run's identity: ``run_id`` (SHA-256 of every setting that shapes the samples), the seed,
  the batch index and the sample range ``[first_sample, first_sample + size)``;
- ``sha256``: a checksum of the shard's tensor contents (names, dtypes, shapes and bytes).

Resume re-verifies both for every shard it would skip, regenerates a shard that is truncated,
bit-flipped or from another run, and the merge refuses any shard that does not verify — a
foreign or corrupt shard is never merged (docs/CONTRACTS.md "Sharded output").

``shards/manifest.json`` names the run (settings + ``run_id``); when the run is finished it also
lists every shard with its checksum (``complete: true``). Readers (:func:`iter_shards`, the merge,
``cps.eval.replication_sharded``) go shard by shard, so nothing ever holds all samples in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_path, read_json, save_safetensors_atomic, write_json_atomic

SHARD_FORMAT = "cpsample_fast.shard/1"
MANIFEST_FORMAT = "cpsample_fast.sample-manifest/1"
MANIFEST = "manifest.json"
LOCK_NAME = ".cpsample.lock"
_SHARD_RE = re.compile(r"batch_(\d{6,})\.safetensors")


class ShardError(ValueError):
    """A shard that is missing, unreadable, corrupt, or belongs to another run."""


def canonical_sha256(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no whitespace, no NaN)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_id(settings: Mapping[str, Any]) -> str:
    """The identity of a sampling run: the hash of every setting that shapes its samples."""
    return canonical_sha256(dict(settings))


def content_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Checksum of tensor contents: each name, dtype, shape and raw bytes, in name order.

    Independent of the file layout, so it can be recomputed from the loaded tensors.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shard_path(out_dir: str | os.PathLike, batch_index: int) -> Path:
    return Path(out_dir) / "shards" / f"batch_{batch_index:06d}.safetensors"


def manifest_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "shards" / MANIFEST


def write_shard(
    out_dir,
    batch_index: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    run: str,
    seed: int,
    first_sample: int,
) -> tuple[Path, str]:
    """Write one batch atomically with its identity and content checksum in the header.

    Returns:
        ``(path, sha256)``.
    """
    sizes = {int(v.shape[0]) for v in tensors.values()}
    if len(sizes) != 1:
        raise ValueError(f"every tensor of a shard must have one row per sample, got {sizes}")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    checksum = content_sha256(cpu)
    meta = {
        "format": SHARD_FORMAT,
        "run_id": run,
        "seed": str(seed),
        "batch": str(batch_index),
        "first_sample": str(first_sample),
        "size": str(sizes.pop()),
        "sha256": checksum,
    }
    path = shard_path(out_dir, batch_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(path, cpu, metadata=meta)
    return path, checksum


def read_shard(
    path: str | os.PathLike,
    *,
    run: str,
    batch_index: int,
    first_sample: int,
    size: int,
    sha256: str | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Load a shard and verify it belongs to ``run`` and holds exactly its batch, unmodified.

    Args:
        path: the shard file.
        run: the expected ``run_id``.
        batch_index, first_sample, size: the batch it must hold.
        sha256: the checksum the manifest lists for it, when known.

    Returns:
        ``(tensors, sha256)``.

    Raises:
        ShardError: missing, unreadable (e.g. truncated), from another run or batch, or its
            contents do not match its checksum.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ShardError(f"shard {p} is missing")
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ShardError(f"shard {p} is unreadable (truncated or corrupt): {exc}") from None
    if meta.get("format") != SHARD_FORMAT:
        raise ShardError(f"shard {p} has no shard identity (format {meta.get('format')!r})")
    if meta.get("run_id") != run:
        raise ShardError(
            f"shard {p} belongs to another run (run_id {str(meta.get('run_id'))[:12]}…, "
            f"expected {run[:12]}…)"
        )
    want = {"batch": str(batch_index), "first_sample": str(first_sample), "size": str(size)}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ShardError(f"shard {p} holds {got}, expected {want}")
    rows = {int(v.shape[0]) for v in tensors.values()}
    if rows != {size}:
        raise ShardError(f"shard {p} has {sorted(rows)} rows per tensor, expected {size}")
    checksum = content_sha256(tensors)
    if checksum != meta.get("sha256"):
        raise ShardError(f"shard {p} is corrupt: its contents do not match its checksum")
    if sha256 is not None and checksum != sha256:
        raise ShardError(f"shard {p} is not the one the manifest lists (checksum differs)")
    return tensors, checksum


# --------------------------------------------------------------------------- manifest


def new_manifest(settings: Mapping[str, Any], num_samples: int, batch_size: int) -> dict:
    """The manifest of a run in progress (``complete`` false, no shard list yet)."""
    return {
        "format": MANIFEST_FORMAT,
        "run_id": run_id(settings),
        "settings": dict(settings),
        "num_samples": int(num_samples),
        "batch_size": int(batch_size),
        "num_batches": math.ceil(num_samples / batch_size),
        "complete": False,
        "shards": None,
    }


def read_manifest(out_dir) -> dict | None:
    """The manifest of ``out_dir`` (``None`` when there is none)."""
    path = manifest_path(out_dir)
    if not path.is_file():
        return None
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path} is not a cpsample_fast sample manifest")
    return m


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def clear_shards(out_dir) -> int:
    """Delete every shard, the manifest and leftover temp files (``--no-resume``)."""
    folder = Path(out_dir) / "shards"
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and (
                _SHARD_RE.fullmatch(p.name) or p.name == MANIFEST or p.name.startswith(".tmp-")
            ):
                p.unlink(missing_ok=True)
                n += 1
    return n


def batch_ranges(num_samples: int, batch_size: int) -> list[tuple[int, int, int]]:
    """Every batch of a run as ``(batch_index, first_sample, size)``."""
    n = math.ceil(num_samples / batch_size)
    return [(b, b * batch_size, min(batch_size, num_samples - b * batch_size)) for b in range(n)]


def iter_shards(
    out_dir, manifest: dict | None = None
) -> Iterator[tuple[int, dict[str, torch.Tensor], str]]:
    """Yield ``(first_sample, tensors, sha256)`` for every shard of a run, in sample order.

    Each shard is verified against the run's identity and its checksum (and against the
    checksum the manifest lists, once the run is complete). One shard is in memory at a time.

    Raises:
        ShardError: a shard is missing, corrupt or foreign; or there is no manifest.
    """
    manifest = read_manifest(out_dir) if manifest is None else manifest
    if manifest is None:
        raise ShardError(f"{manifest_path(out_dir)} not found: not a sharded cpsample output")
    listed = manifest.get("shards") or {}
    for b, first, size in batch_ranges(manifest["num_samples"], manifest["batch_size"]):
        want = listed.get(f"{b:06d}", {}).get("sha256")
        tensors, checksum = read_shard(
            shard_path(out_dir, b),
            run=manifest["run_id"],
            batch_index=b,
            first_sample=first,
            size=size,
            sha256=want,
        )
        yield first, tensors, checksum


def open_sharded_output(out_dir) -> dict:
    """The manifest of a *finished* sharded run (refuses one still in progress)."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise ShardError(f"{manifest_path(out_dir)} not found: not a sharded cpsample output")
    if not manifest.get("complete"):
        raise ShardError(
            f"{Path(out_dir)} is an unfinished run (its manifest is not complete); run the "
            "same cpsample sample command again to finish it"
        )
    return manifest


# --------------------------------------------------------------------------- streaming merge


class StreamingNpzWriter:
    """Write an ``.npz`` whose arrays arrive in row chunks, holding one chunk at a time.

    Each array goes to a temporary ``.npy`` beside the destination (header first, rows
    appended); :meth:`close` zips them into the ``.npz`` atomically (``np.load`` reads it as
    usual) and deletes the temporaries. A failure leaves no ``.npz`` behind.
    """

    def __init__(self, path: str | os.PathLike, rows: int):
        self.path = Path(path)
        self.rows = int(rows)
        self._files: dict[str, tuple[Any, Path, int]] = {}
        self._written: dict[str, int] = {}

    def append(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Append the next rows of each array (every call must name the same arrays)."""
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            if name not in self._files:
                fd, tmp_name = tempfile.mkstemp(
                    dir=self.path.parent, prefix=f".tmp-{self.path.name}-{name}-", suffix=".npy"
                )
                tmp = Path(tmp_name)
                fh = os.fdopen(fd, "wb")  # closed in close()/abort()
                header = {
                    "descr": np.lib.format.dtype_to_descr(arr.dtype),
                    "fortran_order": False,
                    "shape": (self.rows, *arr.shape[1:]),
                }
                np.lib.format.write_array_header_2_0(fh, header)
                self._files[name] = (fh, tmp, arr.shape[1:])
                self._written[name] = 0
            fh, _, tail = self._files[name]
            if arr.shape[1:] != tail:
                raise ValueError(f"{name}: chunk shape {arr.shape} does not continue {tail}")
            fh.write(arr.tobytes())
            self._written[name] += arr.shape[0]

    def close(self) -> Path:
        for name, (fh, _, _) in self._files.items():
            fh.close()
            if self._written[name] != self.rows:
                self.abort()
                raise ValueError(f"{name}: wrote {self._written[name]} rows, expected {self.rows}")
        try:
            with atomic_path(self.path) as tmp:
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                    for name, (_, npy, _) in self._files.items():
                        zf.write(npy, arcname=f"{name}.npy")
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        for fh, npy, _ in self._files.values():
            with contextlib.suppress(OSError):
                fh.close()
            npy.unlink(missing_ok=True)


def image_path(folder: Path, index: int) -> Path:
    """Where sample ``index`` goes in an image-folder output (10 000 files per subfolder)."""
    return folder / f"{index // 10000:05d}" / f"{index:09d}.png"


def write_images(folder: Path, first: int, samples: np.ndarray) -> None:
    """Samples ``[n, C, H, W]`` in [-1, 1] as 8-bit PNGs (atomically, one file each)."""
    from PIL import Image

    u8 = np.clip(np.rint((samples + 1.0) * 127.5), 0, 255).astype(np.uint8)
    for j, img in enumerate(u8):
        path = image_path(folder, first + j)
        arr = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        with atomic_path(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")


# --------------------------------------------------------------------------- lock


class OutputLock:
    """An exclusive ``flock`` on ``<folder>/.cpsample.lock`` for the duration of a run.

    Released by the kernel when the process dies (``kill -9`` included), so a killed run never
    blocks its resume. On network file systems without ``flock`` support the lock is advisory
    at best; run one job per output folder there.
    """

    def __init__(self, folder: str | os.PathLike, name: str = "--out"):
        self.path = Path(folder) / LOCK_NAME
        self.name = name
        self._fh = None

    def acquire(self) -> None:
        import fcntl

        fh = open(self.path, "a+")  # noqa: SIM115 - held open while locked
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise ValueError(
                f"{self.name} {str(self.path.parent)!r} is in use by another cpsample run "
                f"(pid {holder}); wait for it to finish or use another {self.name}"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def finish_manifest(out_dir, manifest: dict, checksums: Mapping[int, str]) -> None:
    """Record every shard with its checksum and mark the run complete."""
    done = dict(manifest)
    sizes = {b: (first, size) for b, first, size in batch_ranges(
        manifest["num_samples"], manifest["batch_size"])}  # fmt: skip
    done["shards"] = {
        f"{b:06d}": {
            "file": shard_path(".", b).name,
            "first_sample": sizes[b][0],
            "size": sizes[b][1],
            "sha256": checksums[b],
        }
        for b in sorted(checksums)
    }
    done["complete"] = True
    write_json_atomic(manifest_path(out_dir), done)
