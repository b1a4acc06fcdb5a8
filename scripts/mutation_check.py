"""Mutation check: break the step's math on purpose and count the tests that notice.

Each mutation is applied to a temporary copy of the repository (never to the checkout), to
every implementation of the math it concerns at once (reference, torch, Triton and the C++/CUDA
``step_math.h``), because the backends are tested against each other: a mutation of one side
only would be caught by any cross-backend comparison, which proves little. The C++ extension is
rebuilt in the copy when a ``csrc/`` file changes (incrementally: one CMake build folder serves
every mutation). Then the chosen tests run and a table gives, per mutation, the number of failing
tests and of test files with a failure. The bar (docs/CONTRACTS.md, issue 13): every mutation
fails at least 3 tests in at least 2 files.

Patterns are small exact strings. A pattern that is not found (the code was rewritten) stops the
run with the mutation, the file and the missing text, so that it can be re-pointed in
``MUTATIONS`` below.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_check.py            # all, tests/
    .venv/bin/python scripts/mutation_check.py --mutations gate-removed \\
        --tests tests/test_guidance.py tests/test_sampler.py
    .venv/bin/python scripts/mutation_check.py --list                        # patterns only
    .venv/bin/python scripts/mutation_check.py --check-patterns              # all found?
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edit:
    """Replace ``old`` by ``new`` in ``path`` (``old`` must occur exactly ``count`` times)."""

    path: str
    old: str
    new: str
    count: int = 1


@dataclass(frozen=True)
class Mutation:
    name: str
    about: str
    edits: tuple[Edit, ...]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "gate-removed",
        "guidance always on: the gate m = 1[|f| > log((1-α)/α)] replaced by True everywhere",
        (
            Edit(
                "cpsample_fast/guidance.py",
                "return a > gate_threshold(alpha)",
                "return torch.ones_like(a, dtype=torch.bool)",
            ),
            Edit(
                "cpsample_fast/guidance.py",
                "return a.float() > gate_threshold_f32(alpha)",
                "return torch.ones_like(a, dtype=torch.bool)",
            ),
            Edit(
                "cpsample_fast/reference.py",
                "m = f.double().abs() > math.log((1 - alpha) / alpha)",
                "m = torch.ones_like(f, dtype=torch.bool)",
            ),
            Edit("cpsample_fast/ops/_triton.py", "m = a > tau", "m = a == a"),
        ),
    ),
    Mutation(
        "seed-sign-flipped",
        "the VJP seed c = s·m·w(f)·sign(f) with -sign(f) (fast paths; the reference uses autograd)",
        (
            Edit(
                "cpsample_fast/guidance.py",
                "* w * torch.sign(f)",
                "* w * -torch.sign(f)",
            ),
            Edit("cpsample_fast/ops/_triton.py", "* w * sign", "* w * -sign"),
        ),
    ),
    Mutation(
        "eps-hat-flipped",
        "ε̂ = ε - G instead of ε + G in the DDIM step (the guidance added to ε with the wrong "
        "sign), every backend",
        (
            Edit(
                "cpsample_fast/reference.py", "eps_hat = eps + guidance", "eps_hat = eps - guidance"
            ),
            Edit("cpsample_fast/ops/_torch.py", "eps = eps + guidance", "eps = eps - guidance"),
            Edit("cpsample_fast/ops/_triton.py", "eps = eps + g\n", "eps = eps - g\n"),
            Edit("csrc/cpsample/step_math.h", "eps = eps + g;", "eps = eps - g;"),
        ),
    ),
    Mutation(
        "philox-key-changed",
        "the Philox key schedule constant 0x9E3779B9 → 0x9E3779BB (torch and C++/CUDA)",
        (
            Edit(
                "cpsample_fast/constants.py",
                "PHILOX_KEY_A = 0x9E3779B9",
                "PHILOX_KEY_A = 0x9E3779BB",
            ),
            Edit(
                "csrc/cpsample/step_math.h",
                "kPhiloxKeyA = 0x9E3779B9u",
                "kPhiloxKeyA = 0x9E3779BBu",
            ),
        ),
    ),
    Mutation(
        "clip-removed",
        "x̂0 no longer clipped to ±clip_sample_range, every backend and both solvers",
        (
            Edit(
                "cpsample_fast/reference.py",
                "x0_hat = x0_hat.clamp(-r_clip, r_clip)",
                "x0_hat = x0_hat",
            ),
            Edit(
                "cpsample_fast/reference.py",
                "x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)",
                "x0 = x0",
            ),
            Edit(
                "cpsample_fast/ops/_torch.py",
                "x0 = torch.clamp(x0, -clip_range, clip_range)",
                "x0 = x0",
                count=2,
            ),
            Edit("cpsample_fast/ops/_triton.py", "x0 = _clamp_keep_nan(x0, c)", "x0 = x0"),
            Edit(
                "cpsample_fast/ops/_triton.py",
                "x0 = _clamp_keep_nan(x0, tl.load(coefs_ptr + 6))",
                "x0 = x0",
            ),
            Edit(
                "csrc/cpsample/step_math.h",
                "if (CLIP) x0 = clamp_keep_nan(x0, c.clip);",
                "if (false) x0 = clamp_keep_nan(x0, c.clip);",
                count=2,
            ),
        ),
    ),
)
BY_NAME = {m.name: m for m in MUTATIONS}


class PatternError(RuntimeError):
    """A mutation's pattern is not in the file (as often as expected)."""


def apply(mutation: Mutation, root: Path) -> list[str]:
    """Apply ``mutation`` under ``root``; returns the edited paths. Checks every pattern first."""
    texts: dict[str, str] = {}
    for edit in mutation.edits:
        text = texts.get(edit.path)
        if text is None:
            path = root / edit.path
            if not path.is_file():
                raise PatternError(f"{mutation.name}: {edit.path} does not exist")
            text = path.read_text(encoding="utf-8")
        found = text.count(edit.old)
        if found != edit.count:
            raise PatternError(
                f"{mutation.name}: expected {edit.count} occurrence(s) of {edit.old!r} in "
                f"{edit.path}, found {found}; re-point the pattern in scripts/mutation_check.py"
            )
        texts[edit.path] = text.replace(edit.old, edit.new)
    for rel, text in texts.items():
        (root / rel).write_text(text, encoding="utf-8")
    return list(texts)


def _repo_files(root: Path) -> list[str]:
    """Tracked files and untracked ones git does not ignore (the working tree as it is)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def copy_repo(dest: Path) -> None:
    """Copy the working tree (and the built ``_C*.so``) to ``dest``."""
    for rel in _repo_files(ROOT):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    for so in (ROOT / "cpsample_fast").glob("_C*.so"):
        shutil.copy2(so, dest / "cpsample_fast" / so.name)


def build(copy: Path, log) -> float:
    """Build ``_C`` in place in the copy (incremental after the first call). Returns seconds."""
    t0 = time.perf_counter()
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL",
                                                                       "2")}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=copy,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building _C in {copy} failed (rc {proc.returncode}); see the log")
    return time.perf_counter() - t0


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("CI", None)  # the copy's _C is always there; CI's checks are not the point here
    return env


def check_import_location(copy: Path) -> None:
    """Make sure the tests import the copy's package, not the editable install's checkout."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import cpsample_fast, sys; sys.stdout.write(cpsample_fast.__file__)",
        ],
        cwd=copy,
        env=_env(copy),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"cpsample_fast imports from {out}, not from the copy {copy}")


@dataclass
class RunResult:
    failed: list[str]  # test ids
    files: set[str]
    passed: int
    seconds: float
    rc: int


def run_tests(copy: Path, tests: list[str], pytest_args: list[str], timeout: float) -> RunResult:
    """Run pytest in the copy; failures (and errors) counted from its JUnit XML."""
    junit = copy / ".mutation_junit.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *pytest_args, f"--junitxml={junit}", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout
        )
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = -1
    seconds = time.perf_counter() - t0
    failed: list[str] = []
    files: set[str] = set()
    passed = 0
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            bad = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            module = case.get("classname", "")
            file = module.replace(".", "/") + ".py" if module else case.get("file", "?")
            if bad:
                failed.append(f"{module}::{case.get('name')}")
                files.add(file)
            elif not skipped:
                passed += 1
    elif rc != 0:
        failed.append(f"<pytest rc {rc}, no report>")
    return RunResult(failed, files, passed, seconds, rc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", nargs="+", choices=sorted(BY_NAME), default=None)
    parser.add_argument("--tests", nargs="+", default=["tests"], help="test paths (in the copy)")
    parser.add_argument(
        "--pytest-args",
        default="-n 2 -q -p no:cacheprovider",
        help="pytest options (default: '-n 2 -q -p no:cacheprovider')",
    )
    parser.add_argument("--baseline", action="store_true", help="also run the unmutated copy")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per test run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--min-tests", type=int, default=3)
    parser.add_argument("--min-files", type=int, default=2)
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument(
        "--check-patterns", action="store_true", help="check every pattern is found, and exit"
    )
    args = parser.parse_args(argv)
    chosen = [BY_NAME[n] for n in args.mutations] if args.mutations else list(MUTATIONS)

    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.about}")
            for e in m.edits:
                print(f"    {e.path}: {e.old!r} -> {e.new!r}")
        return 0
    with tempfile.TemporaryDirectory(prefix="cpsample-patterns-") as tmp:
        # every pattern is checked on a scratch copy of the touched files before anything runs
        for m in chosen:
            for e in m.edits:
                (Path(tmp) / e.path).parent.mkdir(parents=True, exist_ok=True)
                if (ROOT / e.path).is_file():
                    shutil.copy2(ROOT / e.path, Path(tmp) / e.path)
            apply(m, Path(tmp))
            for e in m.edits:
                shutil.copy2(ROOT / e.path, Path(tmp) / e.path)
    if args.check_patterns:
        print(f"all patterns of {len(chosen)} mutation(s) found")
        return 0

    pytest_args = args.pytest_args.split()
    copy = Path(tempfile.mkdtemp(prefix="cpsample-mutation-"))
    log_path = copy.with_suffix(".build.log")
    print(f"copy: {copy} (build log {log_path})", flush=True)
    rows = []
    try:
        copy_repo(copy)
        check_import_location(copy)
        pristine = {e.path: (copy / e.path).read_text(encoding="utf-8")
                    for m in chosen for e in m.edits}  # fmt: skip
        # Python-only mutations first, on the checkout's _C; then those that need a rebuild.
        chosen.sort(key=lambda m: any(e.path.startswith("csrc/") for e in m.edits))
        built_dirty = False  # the copy's _C was built from mutated sources
        with open(log_path, "w") as log:
            plan = ([None] if args.baseline else []) + chosen
            for m in plan:
                name = "baseline" if m is None else m.name
                edited = [] if m is None else apply(m, copy)
                build_s = 0.0
                needs_build = any(p.startswith("csrc/") for p in edited) or (
                    built_dirty and m is not None
                )
                if needs_build:
                    print(f"[{name}] rebuilding _C ...", flush=True)
                    build_s = build(copy, log)
                    built_dirty = any(p.startswith("csrc/") for p in edited)
                print(f"[{name}] running {' '.join(args.tests)} ...", flush=True)
                res = run_tests(copy, args.tests, pytest_args, args.timeout)
                for rel in edited:
                    (copy / rel).write_text(pristine[rel], encoding="utf-8")
                ok = name == "baseline" or (
                    len(res.failed) >= args.min_tests and len(res.files) >= args.min_files
                )
                rows.append((name, len(res.failed), len(res.files), res.passed, res.seconds,
                             build_s, ok, res))  # fmt: skip
                print(f"[{name}] {len(res.failed)} failing tests in {len(res.files)} files "
                      f"({res.passed} passed, {res.seconds:.0f} s)", flush=True)  # fmt: skip
                for test_id in res.failed[:12]:
                    print(f"    {test_id}")
                if len(res.failed) > 12:
                    print(f"    ... {len(res.failed) - 12} more")
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    print()
    head = (
        f"{'mutation':<20} {'failing tests':>13} {'files':>6} {'passed':>7} {'test s':>7}  verdict"
    )
    print(head)
    print("-" * len(head))
    for name, n_fail, n_files, n_pass, secs, _build_s, ok, res in rows:
        verdict = "ok" if ok else f"TOO FEW (< {args.min_tests} tests or < {args.min_files} files)"
        if name == "baseline":
            verdict = "ok" if n_fail == 0 else "BASELINE FAILS"
        print(f"{name:<20} {n_fail:>13} {n_files:>6} {n_pass:>7} {secs:>7.0f}  {verdict}")
        if name != "baseline":
            print(f"{'':<20} files: {', '.join(sorted(res.files)) or '-'}")
    all_ok = all(ok for *_, ok, _res in rows) and all(r[1] == 0 for r in rows if r[0] == "baseline")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
