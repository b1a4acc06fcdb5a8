"""Scale sampling out over processes (``torchrun``), resumably, with rank-invariant samples.

Work is cut into fixed batches of global sample indices; batch ``b`` holds samples
``b·batch_size …`` and goes to rank ``b % world_size``. The counter-based noise (SPEC §4) makes
sample ``i`` a pure function of ``(seed, i)``, so the result does not depend on the number of
ranks, and a batch already on disk is skipped when a killed job is started again. Each batch is
written atomically as its own shard; rank 0 merges the shards when all are present.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .io import (
    load_safetensors,
    read_json,
    safetensors_metadata,
    save_safetensors_atomic,
    write_json_atomic,
)


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> RankInfo:
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by ``torchrun``."""
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    def device(self, requested: str | None = None) -> torch.device:
        """The device for this rank: ``cuda:<local_rank>`` when CUDA is used, else ``requested``."""
        if requested in (None, "auto"):
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return torch.device(requested)


def init_process_group(info: RankInfo, device: torch.device) -> bool:
    """Join the ``torchrun`` process group when there is more than one rank.

    The timeout is long (6 h): rank 0 waits at the final barrier while the other ranks finish
    their last batch, which for long DDPM runs of big models exceeds the 10-minute default.

    Returns True when a group was initialised here (and should be destroyed by the caller).
    """
    if info.world_size <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from datetime import timedelta

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(hours=6))
    return True


def barrier(info: RankInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def batch_plan(num_samples: int, batch_size: int, info: RankInfo) -> list[tuple[int, int, int]]:
    """This rank's batches as ``(batch_index, first_sample, size)``.

    Args:
        num_samples: total number of samples of the job.
        batch_size: samples per batch (the last batch may be smaller).
        info: this process's rank.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = math.ceil(num_samples / batch_size)
    plan = []
    for b in range(info.rank, n_batches, info.world_size):
        start = b * batch_size
        plan.append((b, start, min(batch_size, num_samples - start)))
    return plan


def shard_path(out_dir: str | os.PathLike, batch_index: int) -> Path:
    return Path(out_dir) / "shards" / f"batch_{batch_index:06d}.safetensors"


def write_shard(out_dir, batch_index: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write one batch's tensors atomically (a kill leaves either the whole shard or none)."""
    path = shard_path(out_dir, batch_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(path, tensors, metadata={k: str(v) for k, v in meta.items()})
    return path


def check_manifest(out_dir, manifest: dict, info: RankInfo, *, resume: bool) -> None:
    """Make sure the shards in ``out_dir`` belong to the run described by ``manifest``.

    Shards are reused on resume only when every setting that shapes them (model, protector,
    seed, steps, guidance, batch size, sample count, ...) is the same; otherwise a rerun in the
    same folder would silently merge samples of two different runs.

    Raises:
        ValueError: naming the settings that differ, when resuming into another run's shards.
    """
    path = Path(out_dir) / "shards" / "manifest.json"
    if path.is_file() and resume:
        old = read_json(path)
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise ValueError(
                f"{Path(out_dir)} holds shards of a different run (settings differ: "
                f"{', '.join(diff)}); use another --out, or --no-resume to redo every batch"
            )
    elif info.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, manifest)


def merge_shards(out_dir, num_samples: int, batch_size: int) -> dict[str, np.ndarray]:
    """Concatenate all shards in sample order (every key of the shards).

    Each shard must hold exactly the samples its batch index names (checked against the
    ``first_sample`` it records and its row count), so shards of another batch size are refused.

    Raises:
        FileNotFoundError: naming the missing batches when some shard is absent.
        ValueError: a shard that does not hold the samples of its batch.
    """
    n_batches = math.ceil(num_samples / batch_size)
    missing = [b for b in range(n_batches) if not shard_path(out_dir, b).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shards missing for batches {missing[:10]}{'…' if len(missing) > 10 else ''} in "
            f"{Path(out_dir) / 'shards'}; run the same command again to finish them"
        )
    parts: dict[str, list[np.ndarray]] = {}
    for b in range(n_batches):
        path = shard_path(out_dir, b)
        first, size = b * batch_size, min(batch_size, num_samples - b * batch_size)
        meta = safetensors_metadata(path)
        tensors = load_safetensors(path)
        rows = {int(v.shape[0]) for v in tensors.values()}
        if meta.get("first_sample") != str(first) or rows != {size}:
            raise ValueError(
                f"{path} holds samples from {meta.get('first_sample')} ({sorted(rows)} rows), "
                f"expected {size} from {first}: it belongs to another run; use --no-resume"
            )
        for k, v in tensors.items():
            parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
