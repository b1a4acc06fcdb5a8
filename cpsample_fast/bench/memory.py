"""Peak memory of a measured region: the CUDA allocator's peak, or the process's peak RSS.

On a GPU the number is ``torch.cuda.max_memory_allocated`` since the reset (tensors only). On a
Linux CPU it is the process's resident-set high-water mark (``VmHWM``) since the reset, which
writing ``5`` to ``/proc/self/clear_refs`` starts afresh; it counts the whole process (models,
Python, libraries), so compare providers of one run, not absolute values across machines.
"""

from __future__ import annotations

from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window on ``device`` (best effort on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or not permitted: the window then starts at process start
        pass


def peak_memory_mib(device: torch.device | str) -> float | None:
    """Peak memory in MiB since :func:`reset_peak_memory`, or None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None
