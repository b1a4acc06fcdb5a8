"""Helpers of ``device_check.sh``: the pre-flight inventory and the final short report.

Standard library only at import time (``preflight`` imports torch itself, inside a try), so the
report is written even when the package or torch cannot be imported on the machine.

Usage:
    python3 benchmarks/device_check_report.py preflight OUTDIR
    python3 benchmarks/device_check_report.py summary OUTDIR
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODULES = (
    "torch",
    "triton",
    "numpy",
    "safetensors",
    "tqdm",
    "pytest",
    "pytest_benchmark",
    "pybind11",
    "cmake",
    "ninja",
    "diffusers",
)


def _write_json(path: Path, obj) -> None:
    # atomic: a temporary file in the same folder, then os.replace
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def preflight(out: Path) -> int:
    """Print (and save into status.json later) what this machine has."""
    info: dict = {"python": sys.version.split()[0], "modules": {}}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
            info["modules"][name] = getattr(mod, "__version__", "present")
        except Exception as exc:  # a broken install counts as missing, with the reason
            info["modules"][name] = f"MISSING ({type(exc).__name__})"
    for tool in ("nvcc", "cmake", "ninja", "nvidia-smi", "g++"):
        info[f"which_{tool}"] = shutil.which(tool)
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = list(torch.cuda.get_device_capability(0))
    except Exception as exc:
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    if info.get("which_nvidia-smi"):
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    _write_json(out / "preflight.json.tmp", info)
    print(json.dumps(info, indent=1, sort_keys=True, default=str))
    return 0


def _stages(out: Path) -> list[dict]:
    path = out / "stages.tsv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _rows(out: Path) -> list[dict]:
    path = out / "bench.csv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _sampler_table(rows: list[dict]) -> list[str]:
    sample = [r for r in rows if r["op"].startswith("sample/")]
    if not sample:
        return ["sampler: no rows (see device_check.log)"]
    value: dict = {}
    order: list[str] = []
    for r in sample:
        key = (r["op"], r["provider"])
        if key not in order:
            order.append(key)
        value[(key, r["metric"])] = float(r["median"])

    def cell(key, metric, fmt):
        v = value.get((key, metric))
        return "-" if v is None else format(v, fmt)

    head = (
        f"{'op':<14} {'provider':<20} {'img/s':>9} {'ms/step':>8} {'eps':>7} {'prot':>7} "
        f"{'upd':>6} {'x ref':>6} {'err fp64':>9} {'err/ref':>7} {'1st s':>6}"
    )
    lines = [head, "-" * len(head)]
    for key in order:
        lines.append(
            f"{key[0]:<14} {key[1]:<20} {cell(key, 'images_per_s', '.1f'):>9} "
            f"{cell(key, 'ms_per_step', '.2f'):>8} {cell(key, 'eps_model_ms', '.2f'):>7} "
            f"{cell(key, 'protector_ms', '.2f'):>7} {cell(key, 'update_ms', '.3f'):>6} "
            f"{cell(key, 'speedup_vs_reference', '.2f'):>6} "
            f"{cell(key, 'max_abs_err_vs_fp64', '.1e'):>9} "
            f"{cell(key, 'err_ratio_vs_reference_same_dtype', '.2f'):>7} "
            f"{cell(key, 'first_call_s', '.1f'):>6}"
        )
    return lines


def _update_table(rows: list[dict]) -> list[str]:
    bw = [r for r in rows if r["op"] == "guided_update" and r["metric"] == "bandwidth"]
    if not bw:
        return ["update op: no rows"]
    sizes = sorted({int(float(r["x"])) for r in bw})
    providers = list(dict.fromkeys(r["provider"] for r in bw))
    gbps = {(r["provider"], int(float(r["x"]))): float(r["median"]) for r in bw}
    head = f"{'update GB/s':<16}" + "".join(f"{s:>10.0e}" for s in sizes)
    lines = [head, "-" * len(head)]
    for p in providers:
        cells = "".join(f"{gbps[(p, s)]:>10.1f}" if (p, s) in gbps else f"{'-':>10}" for s in sizes)
        lines.append(f"{p:<16}{cells}")
    return lines


def _matched_table(rows: list[dict]) -> list[str]:
    """Images/s of protected DDIM-50 and the quality-matched DPM-Solver++ and their ratio."""
    matched = [r for r in rows if r["op"] == "sample_matched" and r["metric"] == "images_per_s"]
    if not matched:
        return ["quality matched: no rows"]
    ddim = [float(r["median"]) for r in matched if r["provider"].startswith("ddim-")]
    lines = [f"{'quality matched':<16} {'img/s':>9} {'x DDIM':>7}"]
    for r in matched:
        ratio = float(r["median"]) / ddim[-1] if ddim else float("nan")
        lines.append(f"{r['provider']:<16} {float(r['median']):>9.1f} {ratio:>7.2f}")
    return lines


def summary(out: Path) -> int:
    """Write status.json and summary.txt; print the short table (the script's last output)."""
    stages = _stages(out)
    rows = _rows(out)
    pre = out / "preflight.json.tmp"
    preflight_info = json.loads(pre.read_text()) if pre.is_file() else None
    if pre.is_file():
        pre.unlink()
    lines = ["device check: stages"]
    lines += [
        f"  {s['stage']:<16} {s['status']:<8} rc={s['rc']:<4} {s['seconds']:>4}s "
        f"(limit {s['limit_s']}s) {s['note']}"
        for s in stages
    ]
    lines += [""] + _sampler_table(rows) + [""] + _matched_table(rows) + [""] + _update_table(rows)
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    status = {
        "ok": bool(stages) and all(s["status"] in ("ok", "skipped") for s in stages),
        "stages": stages,
        "preflight": preflight_info,
        "bench_rows": len(rows),
    }
    _write_json(out / "status.json", status)
    print(text)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("preflight", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    if not out.is_dir():
        raise ValueError(f"OUTDIR {str(out)!r} is not a directory")
    return preflight(out) if argv[0] == "preflight" else summary(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
