"""Scale sampling out over processes (``torchrun``), resumably, with rank-invariant samples.

Work is cut into fixed batches of global sample indices; batch ``b`` holds samples
``b·batch_size …`` and goes to rank ``b % world_size``. The counter-based noise (docs/ALGORITHM.md
§4) makes
sample ``i`` a pure function of ``(seed, i)``, so the result does not depend on the number of
ranks, and a batch already on disk (and verified, :mod:`cpsample_fast.shards`) is skipped when a
killed job is started again. Each batch is written atomically as its own self-verifying shard;
rank 0 merges the shards when all are present.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch


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


def all_agree(info: RankInfo, ok: bool) -> bool:
    """True on every rank iff ``ok`` is true on every rank (a MIN all-reduce; no-op alone).

    Used where only some ranks can tell that the run must stop (rank 0 holds the output lock,
    for example), so that every rank stops instead of the others hanging at the next barrier.
    """
    if info.world_size <= 1:
        return ok
    import torch.distributed as dist

    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_sum(info: RankInfo, value: float) -> float:
    """The sum of ``value`` over all ranks (``value`` itself for a single process)."""
    if info.world_size <= 1:
        return value
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item())


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
