"""Scale sampling out over processes (``torchrun``), resumably, with rank-invariant samples.

Work is cut into fixed batches of global sample indices; batch ``b`` holds samples
``b·batch_size …`` and goes to rank ``b % world_size``. The counter-based noise (docs/ALGORITHM.md
§4) makes
sample ``i`` a pure function of ``(seed, i)``, so the result does not depend on the number of
ranks, and a batch already on disk (and verified, :mod:`cpsample_fast.shards`) is skipped when a
killed job is started again. Each batch is written atomically as its own self-verifying shard;
rank 0 merges the shards when all are present.

The first half holds the rank primitives (:class:`RankInfo`, the process group, collectives,
:func:`batch_plan`); the second half the run built on them: :func:`run_sharded` (lock and
prepare the folder, skip verified shards, sample the rest, merge on rank 0), with its stages
:func:`claim_output`, :func:`pending_batches`, :func:`merge_run` and the shard tensors
:func:`audit_record`. The on-disk format itself lives in :mod:`cpsample_fast.shards`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


# --------------------------------------------------------------------------- a sharded run


def audit_record(x: torch.Tensor, trace, first_sample: int) -> dict[str, torch.Tensor]:
    """A batch's shard tensors: the samples and the per-sample audit record.

    ``gate [n, steps]`` (uint8: 1 at each loop step where guidance acted), ``confidence
    [n, steps]`` (q, NaN where the protector was not run), ``final_confidence [n]`` (q at the
    last step where the protector ran; NaN if it never ran) and ``sample_index [n]``
    (docs/CONTRACTS.md "Sharded output").
    """
    conf = trace.confidence.T.contiguous().float().cpu()  # [n, steps]
    steps = conf.shape[1]
    pos = torch.where(~torch.isnan(conf), torch.arange(steps), -1).amax(1)  # [n]
    final = conf.gather(1, pos.clamp_min(0)[:, None])[:, 0]
    final = torch.where(pos >= 0, final, torch.full_like(final, float("nan")))
    n = x.shape[0]
    return {
        "samples": x.float().clamp(-1, 1).cpu(),
        "gate": trace.gate.T.contiguous().to(torch.uint8).cpu(),
        "confidence": conf,
        "final_confidence": final,
        "sample_index": torch.arange(first_sample, first_sample + n, dtype=torch.int64),
    }


def prepare_output(out: Path, manifest: dict, *, resume: bool, result_files=()) -> None:
    """Rank 0, holding the lock: refuse another run's shards, or clear them (``resume=False``);
    remove the finished-run files; write the run's manifest.

    Raises:
        ValueError: naming ``--out`` when it holds shards of a run with other settings.
    """
    from .io import write_json_atomic
    from .shards import ShardError, clear_shards, manifest_path, read_manifest, settings_diff

    if resume:
        try:
            old = read_manifest(out)
        except (ShardError, ValueError) as err:
            raise ValueError(
                f"{err}; use another --out, or --no-resume to redo every batch"
            ) from None
        if old is not None and old.get("run_id") != manifest["run_id"]:
            diff = settings_diff(old.get("settings") or {}, manifest["settings"])
            raise ValueError(
                f"--out {str(out)!r} holds shards of a different run (settings differ: "
                f"{', '.join(diff) or 'run id'}); use another --out, or --no-resume to redo "
                "every batch"
            )
    else:
        clear_shards(out)
    for name in result_files:
        (out / name).unlink(missing_ok=True)
    write_json_atomic(manifest_path(out), manifest)


def claim_output(info: RankInfo, out: Path, manifest: dict, **prepare):
    """Rank 0 locks ``out`` and prepares it (:func:`prepare_output`); every rank learns whether
    the run may go on (so that none hangs at a later barrier when rank 0 refused).

    Returns:
        The held :class:`~cpsample_fast.shards.OutputLock` (the caller releases it).
    """
    from .shards import OutputLock

    lock = OutputLock(out, "--out")
    refusal = None
    if info.rank == 0:
        try:
            lock.acquire()
            prepare_output(out, manifest, **prepare)
        except ValueError as err:
            lock.release()
            refusal = err
    if not all_agree(info, refusal is None):  # also the barrier after rank 0's preparation
        raise refusal or ValueError("rank 0 refused the run; see its message")
    return lock


def pending_batches(out: Path, plan, run: str, warn=None) -> tuple[list, int]:
    """``(todo, verified)``: this rank's batches without a verified shard on disk, and how many
    were verified (a truncated, corrupt or foreign shard is reported through ``warn`` and
    regenerated)."""
    from .shards import ShardError, read_shard, shard_path

    todo, verified = [], 0
    for b, first, size in plan:
        path = shard_path(out, b)
        if path.exists():
            try:
                read_shard(path, run=run, batch_index=b, first_sample=first, size=size)
                verified += 1
                continue
            except ShardError as err:
                if warn is not None:
                    warn(f"{err}; regenerating it")
        todo.append((b, first, size))
    return todo, verified


def run_sharded(
    sample_batch: Callable[[int, int], dict[str, torch.Tensor]],
    out: Path,
    manifest: dict,
    *,
    info: RankInfo,
    seed: int,
    output: str = "npz",
    resume: bool = True,
    progress: bool = True,
    result_files=(),
    announce: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict | None:
    """Sample this rank's missing batches into shards, then (rank 0) merge the run.

    Args:
        sample_batch: ``(first_sample, size) -> shard tensors`` (see :func:`audit_record`).
        out: the output folder (locked for the run).
        manifest: the run's manifest (``shards.new_manifest``).
        info: this process's rank.
        seed: the run's noise seed (recorded in each shard).
        output: ``npz``, ``shards`` or ``images`` (:func:`merge_run`).
        resume: keep verified shards of the same run; else clear the folder's shards first.
        progress: a progress bar on rank 0.
        result_files: the files of a finished run, removed when the run starts.
        announce: called on rank 0 with the number of batches already done (verified).
        warn: receives one line per shard that is regenerated.

    Returns:
        On rank 0 the merge statistics plus ``rank0_seconds`` and ``rank0_images_per_second``;
        ``None`` on the other ranks.
    """
    from tqdm import tqdm

    from .shards import write_shard

    plan = batch_plan(manifest["num_samples"], manifest["batch_size"], info)
    lock = claim_output(info, out, manifest, resume=resume, result_files=result_files)
    try:
        todo, verified = pending_batches(out, plan, manifest["run_id"], warn)
        done_before = int(all_sum(info, verified))
        if info.rank == 0 and announce is not None:
            announce(done_before)
        t0 = time.perf_counter()
        done = 0
        for b, start, size in tqdm(todo, disable=not progress or info.rank != 0, desc="batches"):
            tensors = sample_batch(start, size)
            write_shard(out, b, tensors, run=manifest["run_id"], seed=seed, first_sample=start)
            done += size
        elapsed = time.perf_counter() - t0
        barrier(info)
        if info.rank != 0:
            return None
        stats = merge_run(out, manifest, output)
        speed = done / elapsed if done and elapsed > 0 else None
        return {"rank0_seconds": elapsed, "rank0_images_per_second": speed, **stats}
    finally:
        lock.release()


def merge_run(out: Path, manifest: dict, output: str = "npz") -> dict:
    """Verify every shard, stream them into the chosen output, record their checksums in the
    manifest, and write ``grid.png`` / ``trace.png``. One shard is in memory at a time.

    Returns:
        Summary statistics for ``sample.json`` (guidance fractions, files written).
    """
    import numpy as np

    from .eval.plots import save_image_grids, save_lines_png
    from .shards import StreamingNpzWriter, finish_manifest, iter_shards, write_images

    n = manifest["num_samples"]
    writer = StreamingNpzWriter(out / "samples.npz", n) if output == "npz" else None
    checksums: dict[int, str] = {}
    gate_sum = conf_sum = conf_cnt = None
    ever, grid = 0, []
    try:
        for b, (first, tensors, checksum) in enumerate(iter_shards(out, manifest)):
            checksums[b] = checksum
            arrays = {k: v.numpy() for k, v in tensors.items()}
            if writer is not None:
                writer.append(arrays)
            if output == "images":
                write_images(out / "images", first, arrays["samples"])
            gate = arrays["gate"].astype(np.float64)
            conf = arrays["confidence"].astype(np.float64)
            ok = ~np.isnan(conf)
            if gate_sum is None:
                gate_sum, conf_sum, conf_cnt = (np.zeros(gate.shape[1]) for _ in range(3))
            gate_sum += gate.sum(0)
            conf_sum += np.where(ok, conf, 0.0).sum(0)
            conf_cnt += ok.sum(0)
            ever += int((gate.max(1) > 0).sum())
            if sum(g.shape[0] for g in grid) < 64:
                grid.append(arrays["samples"][: 64 - sum(g.shape[0] for g in grid)])
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    files = []
    if writer is not None:
        writer.close()
        files.append("samples.npz")
    if output == "images":
        files.append("images/")
    finish_manifest(out, manifest, checksums)
    files.append("shards/manifest.json")
    save_image_grids({"samples": torch.from_numpy(np.concatenate(grid))}, out / "grid.png")
    steps = np.arange(gate_sum.shape[0])
    with np.errstate(all="ignore"):
        mean_conf = np.where(conf_cnt > 0, conf_sum / np.maximum(conf_cnt, 1), np.nan)
    save_lines_png(
        {"fraction guided": (steps, gate_sum / n), "mean confidence q": (steps, mean_conf)},
        out / "trace.png",
        xlabel="step",
        ylabel="value",
        title="guidance per step",
    )
    files += ["grid.png", "trace.png"]
    return {
        "fraction_of_samples_ever_guided": ever / n,
        "mean_fraction_guided_per_step": (gate_sum / n).tolist(),
        "files": files,
    }
