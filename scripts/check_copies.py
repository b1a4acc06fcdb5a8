"""Check that every deliberate copy of the guided steps carries the same numbered stages.

The DDIM step (docs/ALGORITHM.md §3 steps 1, 6 and 7) is written out four times on purpose: the
reference loop, the torch specification (and its backward), the Triton kernel and the C++/CUDA
per-element formula; the guided DPM-Solver++ step likewise (its x̂0 stages are §3's, its update
is docs/CONTRACTS.md "The multistep update"). The backends are tested against each other
numerically; this check keeps their *structure* in step, as diffusers' ``# Copied from``
markers do: each copy marks its stages with the same comment (``# §3.6b guidance after the
clip`` in Python, ``// …`` in C++), and every marker must be present, once, in the order of the
algorithm (reversed in the backward).

Usage::

    .venv/bin/python scripts/check_copies.py      # exit 1 and one line per problem

``check(root)`` returns the problems as strings; ``tests/test_copies.py`` calls it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The stages of one guided DDIM step, as docs/ALGORITHM.md §3 numbers them.
STAGES: tuple[tuple[str, str], ...] = (
    ("§3.1", "x0 and eps from the model output"),
    ("§3.6a", "clip the model's own x0"),
    ("§3.6b", "guidance after the clip"),
    ("§3.6c", "use_clipped_model_output"),
    ("§3.7", "DDIM update"),
)
# The guided DPM-Solver++ step: the same x̂0 stages, then the multistep update of
# docs/CONTRACTS.md "The multistep update".
DPM_STAGES: tuple[tuple[str, str], ...] = (
    ("§3.1", "x0 from the model output"),
    ("§3.6a", "clip the model's own x0"),
    ("§3.6b", "guidance after the clip"),
    ("DPM", "multistep update"),
)


@dataclass(frozen=True)
class Copy:
    """One copy of a step: the function in ``path`` whose first line contains ``anchor``."""

    path: str
    anchor: str
    reverse: bool = False  # a backward pass meets the stages in reverse order
    stages: tuple[tuple[str, str], ...] = STAGES


COPIES: tuple[Copy, ...] = (
    Copy("cpsample_fast/reference.py", "def _reference_ddim_step("),
    Copy("cpsample_fast/ops/_torch.py", "def guided_update("),
    Copy("cpsample_fast/ops/_torch.py", "def guided_update_backward(", reverse=True),
    Copy("cpsample_fast/ops/_triton.py", "def _guided_update_kernel("),
    Copy("csrc/cpsample/step_math.h", "float guided_update_element("),
    Copy("cpsample_fast/reference.py", "def _reference_dpmsolver(", stages=DPM_STAGES),
    Copy("cpsample_fast/ops/_torch.py", "def dpm_update(", stages=DPM_STAGES),
    Copy("cpsample_fast/ops/_triton.py", "def _dpm_update_kernel(", stages=DPM_STAGES),
    Copy("csrc/cpsample/step_math.h", "float dpm_update_element(", stages=DPM_STAGES),
)


def marker(stage: tuple[str, str]) -> str:
    """The text a copy carries for ``stage`` (after its comment prefix)."""
    return f"{stage[0]} {stage[1]}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def function_lines(text: str, anchor: str, path: str) -> list[str]:
    """The lines of the function whose first line contains ``anchor``: in Python up to the next
    line indented no deeper than its ``def`` (the signature's closing ``)`` aside), in C/C++ up to
    its closing ``}``. Raises ``LookupError`` when the anchor is missing or ambiguous."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if anchor in line]
    if len(starts) != 1:
        raise LookupError(f"{path}: expected one line containing {anchor!r}, found {len(starts)}")
    start = starts[0]
    base = _indent(lines[start])
    c_like = not path.endswith(".py")
    for end in range(start + 1, len(lines)):
        line = lines[end]
        if not line.strip() or _indent(line) > base:
            continue
        if c_like and line.lstrip().startswith("}"):
            return lines[start : end + 1]
        if not c_like and not line.lstrip().startswith(")"):
            return lines[start:end]
    return lines[start:]


def check_copy(root: Path, copy: Copy) -> list[str]:
    """Problems of one copy: a stage missing, repeated, or out of order (file and stage named)."""
    path = root / copy.path
    if not path.is_file():
        return [f"{copy.path}: file not found"]
    try:
        body = function_lines(path.read_text(encoding="utf-8"), copy.anchor, copy.path)
    except LookupError as err:
        return [str(err)]
    where = f"{copy.path} ({copy.anchor.rstrip('(')})"
    stages = copy.stages[::-1] if copy.reverse else copy.stages
    problems, positions = [], []
    for stage in stages:
        hits = [i for i, line in enumerate(body) if marker(stage) in line]
        if not hits:
            problems.append(f"{where}: missing stage marker {marker(stage)!r}")
        elif len(hits) > 1:
            problems.append(f"{where}: stage marker {marker(stage)!r} appears {len(hits)} times")
        else:
            positions.append((hits[0], stage))
    for (a, first), (b, second) in zip(positions, positions[1:]):
        if b < a:
            problems.append(
                f"{where}: stage {marker(second)!r} comes before {marker(first)!r}; expected "
                f"{'reverse ' if copy.reverse else ''}docs/ALGORITHM.md §3 order"
            )
    return problems


def check(root: Path = ROOT, copies: tuple[Copy, ...] = COPIES) -> list[str]:
    """Every problem of every copy (empty when all copies carry all stages in order)."""
    return [problem for copy in copies for problem in check_copy(Path(root), copy)]


def main() -> int:
    problems = check()
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{len(COPIES)} copies of the guided steps carry all their stages in order")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
