"""The deliberate copies of the guided steps carry the same numbered stages (check_copies.py).

The copies (reference, torch forward and backward, Triton, C++/CUDA) are compared numerically
elsewhere; this keeps their structure in step with docs/ALGORITHM.md §3, and checks that the
checker itself fails, naming the file and the stage, when a copy loses a stage or reorders two.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_copies  # noqa: E402


def _copy_tree(tmp_path: Path) -> Path:
    """The files the checker reads, copied under ``tmp_path`` (so they can be broken there)."""
    for path in {c.path for c in check_copies.COPIES}:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, tmp_path / path)
    return tmp_path


def _edit(root: Path, path: str, old: str, new: str) -> None:
    text = (root / path).read_text(encoding="utf-8")
    assert text.count(old) >= 1, f"{old!r} not in {path}"
    (root / path).write_text(text.replace(old, new, 1), encoding="utf-8")  # the first only


def test_every_copy_carries_every_stage_in_order():
    assert check_copies.check(ROOT) == []


def test_the_copies_cover_every_implementation_of_the_step():
    paths = {c.path for c in check_copies.COPIES}
    assert paths == {
        "cpsample_fast/reference.py",
        "cpsample_fast/ops/_torch.py",
        "cpsample_fast/ops/_triton.py",
        "csrc/cpsample/step_math.h",
    }
    anchors = {c.anchor for c in check_copies.COPIES}
    assert {"def _dpm_update_kernel(", "float dpm_update_element("} <= anchors
    # the §3 stage ids are the numbered steps of docs/ALGORITHM.md §3
    algorithm = (ROOT / "docs/ALGORITHM.md").read_text(encoding="utf-8")
    section = algorithm[algorithm.index("## 3.") : algorithm.index("## 4.")]
    ids = {i for i, _ in check_copies.STAGES + check_copies.DPM_STAGES if i.startswith("§3.")}
    for stage_id in ids:
        step = stage_id.removeprefix("§3.").rstrip("abc")
        assert f"\n{step}. **" in section, f"docs/ALGORITHM.md §3 has no step {step}"


@pytest.mark.parametrize("copy", check_copies.COPIES, ids=lambda c: f"{c.path}:{c.anchor}")
def test_a_missing_stage_is_named_with_its_file(tmp_path, copy):
    root = _copy_tree(tmp_path)
    marker = check_copies.marker(copy.stages[2])  # §3.6b guidance after the clip
    body = "\n".join(
        check_copies.function_lines(
            (root / copy.path).read_text(encoding="utf-8"), copy.anchor, copy.path
        )
    )
    line = next(line for line in body.splitlines() if marker in line)
    _edit(root, copy.path, line, line.replace(marker, "guidance"))
    problems = check_copies.check(root)
    assert len(problems) == 1, problems
    assert copy.path in problems[0] and "missing" in problems[0] and marker in problems[0]


def test_stages_out_of_order_are_reported(tmp_path):
    root = _copy_tree(tmp_path)
    path = "csrc/cpsample/step_math.h"
    clip, guide = (check_copies.marker(s) for s in check_copies.STAGES[1:3])
    _edit(root, path, f"// {clip}", "// @@swap@@")
    _edit(root, path, f"// {guide}", f"// {clip}")
    _edit(root, path, "// @@swap@@", f"// {guide}")
    problems = check_copies.check(root)
    assert len(problems) == 1, problems
    assert path in problems[0] and "comes before" in problems[0]


def test_a_backward_copy_must_run_in_reverse(tmp_path):
    root = _copy_tree(tmp_path)
    forward = check_copies.Copy("cpsample_fast/ops/_torch.py", "def guided_update_backward(")
    problems = check_copies.check(root, (forward,))
    assert problems and all("comes before" in p for p in problems)


def test_a_repeated_stage_and_a_missing_function_are_reported(tmp_path):
    root = _copy_tree(tmp_path)
    path = "cpsample_fast/ops/_torch.py"
    marker = check_copies.marker(check_copies.STAGES[0])
    _edit(root, path, f"    # {marker}\n", f"    # {marker}\n    # {marker}\n")
    problems = check_copies.check(root)
    assert any(path in p and "appears 2 times" in p for p in problems), problems
    gone = check_copies.Copy(path, "def no_such_function(")
    assert "found 0" in check_copies.check(root, (gone,))[0]
