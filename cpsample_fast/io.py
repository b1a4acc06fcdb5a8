"""Safetensors weights and JSON sidecars, written atomically; pickle files refused.

Every writer here puts the bytes into a temporary file in the destination folder and then
``os.replace``-s it onto the final name, so a reader sees either the old file or the new one,
never half of one (a kill mid-write leaves at most a ``.tmp-*`` file, which the writer removes
when it can).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# Suffixes of formats that torch / pickle load by executing code; never opened here.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def refuse_pickle(path: str | os.PathLike) -> Path:
    """Raise ``ValueError`` if ``path`` names a pickle-based file; return it as a ``Path``.

    Args:
        path: A file path about to be read or written.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: the suffix is one of :data:`PICKLE_SUFFIXES`.
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing pickle-based file {str(p)!r}: loading it could run arbitrary code. "
            "cpsample_fast reads and writes weights only as .safetensors (+ a .json sidecar); "
            "convert the file once with safetensors.torch.save_file in a trusted session."
        )
    return p


def ensure_writable_dir(path: str | os.PathLike, name: str = "directory") -> Path:
    """Create ``path`` if needed and check that files can be created in it.

    Called before a long job starts, so that a bad output folder fails at once instead of after
    an hour of training.

    Args:
        path: The folder.
        name: How the folder is called in error messages (the argument's name).

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: the folder cannot be created or written.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{name} {str(p)!r} is not a writable directory: {exc}") from exc
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every file system can fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` atomically.

    On an exception the temporary file is deleted and ``path`` is left untouched.

    Args:
        path: Final file name.

    Yields:
        The temporary file to write.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".tmp-{final.name}-")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates mode 0600, and some writers (safetensors) replace the temporary file
        # with a new 0600 one: after writing, give it the mode a plain open() would (0666 less
        # the umask), so every file of a run has one mode and other users can read results
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def save_safetensors_atomic(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to a safetensors file atomically.

    Tensors are made contiguous and moved to the CPU; shared storage is cloned (safetensors
    refuses aliased tensors).

    Args:
        path: Destination, normally ending in ``.safetensors``.
        tensors: Name → tensor.
        metadata: Optional string → string header metadata.

    Returns:
        The destination path.
    """
    p = refuse_pickle(path)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to Tensor, got {type(tensors)}")
    flat = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensors[{key!r}] must be a Tensor, got {type(value)}")
        flat[key] = value.detach().to("cpu").contiguous().clone()
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    with atomic_path(p) as tmp:
        save_file(flat, str(tmp), metadata=meta)
    return p


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read every tensor of a safetensors file.

    Args:
        path: The file.
        device: Where to put the tensors.

    Returns:
        Name → tensor.

    Raises:
        ValueError: pickle-based suffix. FileNotFoundError: no such file.
    """
    p = refuse_pickle(path)
    if not p.is_file():
        raise FileNotFoundError(f"no safetensors file at {str(p)!r}")
    return load_file(str(p), device=str(device))


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string header metadata of a safetensors file (``{}`` when it has none)."""
    from safetensors import safe_open

    p = refuse_pickle(path)
    with safe_open(str(p), framework="pt") as fh:
        return dict(fh.metadata() or {})


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``obj`` as JSON (UTF-8, sorted keys) and write it atomically.

    Args:
        path: Destination.
        obj: Anything ``json.dumps`` accepts.
        indent: Passed to ``json.dumps``.

    Returns:
        The destination path.
    """
    p = Path(path)
    text = json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False)
    with atomic_path(p) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return p


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with a clear error when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no JSON file at {str(p)!r}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(p)!r} is not valid JSON: {exc}") from exc
