"""One output schema for every benchmark: Liger-style CSV rows plus the run's environment.

Columns (benchmarks/README.md "CSV schema"): ``op, provider, mode, metric, unit, x_name, x, median,
p20, p80, device, versions, commit, timestamp, extra``. A row is one measured quantity of one
provider at one size; ``extra`` is a JSON object with the configuration that produced it. Rows
are appended to a CSV file (rewritten atomically, so a killed run never leaves a half-written
line) and kept in the run's JSON (:class:`RunLog`).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io import atomic_path, write_json_atomic

CSV_COLUMNS = (
    "op",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x",
    "median",
    "p20",
    "p80",
    "device",
    "versions",
    "commit",
    "timestamp",
    "extra",
)


def device_name(device: torch.device | str) -> str:
    """A human name of the device: the GPU's name, or the CPU model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def versions() -> str:
    """``torch=…;triton=…;cpsample_fast=…;cuda=…`` of this process."""
    from .._version import __version__

    parts = [f"torch={torch.__version__}"]
    try:
        import triton

        parts.append(f"triton={triton.__version__}")
    except ImportError:
        parts.append("triton=none")
    parts.append(f"cpsample_fast={__version__}")
    parts.append(f"cuda={torch.version.cuda or 'none'}")
    return ";".join(parts)


def _git(root: Path, *args: str) -> str:
    """stdout of ``git -C root args`` (raises ``OSError`` / ``SubprocessError`` on failure)."""
    cmd = ["git", "-C", str(root), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """Short commit of the git checkout at ``repo`` (default: the working directory, where the
    user runs the benchmark), ``+dirty`` when modified, or ``unknown`` outside a checkout.

    Not the package's own location: an installed wheel has no git history, so the commit that
    identifies a run is the one of the project the user is measuring from.
    """
    root = Path(repo) if repo is not None else Path.cwd()
    try:
        sha = _git(root, "rev-parse", "--short=12", "HEAD").strip()
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


@dataclass(frozen=True)
class Environment:
    """Where and when a run was measured (the shared columns of its rows)."""

    device: str
    versions: str
    commit: str
    timestamp: str

    @classmethod
    def capture(cls, device: torch.device | str) -> Environment:
        """The environment of this process measuring on ``device``, timestamped now (UTC)."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(device_name(device), versions(), git_commit(), now)


@dataclass
class Row:
    """One measured quantity (one CSV line)."""

    op: str
    provider: str
    mode: str
    metric: str
    unit: str
    x_name: str
    x: float
    median: float
    p20: float
    p80: float
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("median", "p20", "p80"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(
                    f"Row {self.provider}/{self.metric}: {name} is not finite ({value})"
                )
            setattr(self, name, value)

    def to_record(self, env: Environment) -> dict:
        """The CSV / JSON record of this row in ``env``."""
        record = asdict(self)
        record.update(asdict(env))
        record["extra"] = json.dumps(self.extra, sort_keys=True)
        return {key: record[key] for key in CSV_COLUMNS}


def append_csv(path: str | os.PathLike, records: list[dict]) -> Path:
    """Append ``records`` (dicts with :data:`CSV_COLUMNS`) to the CSV at ``path``, atomically.

    The file is rewritten through a temporary file and ``os.replace``; a header is written when
    the file is new. A file with another header is refused rather than mixed.
    """
    p = Path(path)
    old = p.read_text(encoding="utf-8") if p.is_file() else ""
    if old:
        header = old.splitlines()[0].split(",")
        if tuple(header) != CSV_COLUMNS:
            raise ValueError(f"{str(p)!r} has columns {header}, expected {list(CSV_COLUMNS)}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    if not old:
        writer.writeheader()
    for record in records:
        missing = set(CSV_COLUMNS) - set(record)
        if missing:
            raise ValueError(f"record lacks columns {sorted(missing)}")
        writer.writerow({key: record[key] for key in CSV_COLUMNS})
    if old and not old.endswith("\n"):
        old += "\n"
    with atomic_path(p) as tmp:
        tmp.write_text(old + buf.getvalue(), encoding="utf-8")
    return p


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a benchmark CSV as dicts of strings."""
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def report_path(out_dir: str | os.PathLike, name: str) -> Path:
    """``out_dir/bench_<name>_<UTC time>.json``: one run's JSON report."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(out_dir) / f"bench_{name}_{stamp}.json"


class RunLog:
    """One run's rows, written as they are measured: appended to ``out_dir/bench.csv`` and the
    whole JSON report rewritten (both atomic), so a run cut short by a time limit keeps what it
    measured. Without ``out_dir`` the records are only collected.

    Args:
        env: the run's environment (the shared columns of its rows).
        out_dir: an existing writable folder, or None.
        name: names the JSON report (:func:`report_path`), e.g. ``tiny_cpu``.
        header: JSON-able entries the report starts with (e.g. the command's options).
    """

    def __init__(self, env: Environment, out_dir: Path | None, name: str, header: dict) -> None:
        self.env = env
        self.records: list[dict] = []
        self.header = {"environment": asdict(env), **header}
        self.csv_path = None if out_dir is None else Path(out_dir) / "bench.csv"
        self.json_path = None if out_dir is None else report_path(out_dir, name)

    def add(self, rows: list[Row]) -> None:
        """Record ``rows`` now (CSV and a JSON marked ``complete: false``)."""
        new = [row.to_record(self.env) for row in rows]
        self.records.extend(new)
        if self.csv_path is not None:
            append_csv(self.csv_path, new)
            write_json_atomic(
                self.json_path, {**self.header, "rows": self.records, "complete": False}
            )

    def finish(self, sections: dict) -> dict:
        """The complete report (``sections`` added, e.g. each suite's summary and the table),
        written when there is a folder."""
        report = {**self.header, **sections, "rows": self.records, "complete": True}
        if self.json_path is not None:
            write_json_atomic(self.json_path, report)
        return report
