"""Benchmark harness shared by ``cpsample bench`` and ``benchmarks/`` (pytest-benchmark).

- :mod:`.timing`: warm-up, device synchronisation, median / p20 / p80 over repeats;
- :mod:`.records`: the one CSV schema (benchmarks/README.md) and the run's environment;
- :mod:`.configs`: named configurations (``tiny``, ``cifar``, ``gpu35m``) and their models;
- :mod:`.sampler_suite`: every sampling provider of a configuration, in one process;
- :mod:`.update_suite`: the fused update alone per backend, GB/s against a measured copy.
"""

from .configs import CONFIGS, BenchConfig, build_models, get_config
from .records import CSV_COLUMNS, Environment, Row, append_csv, read_csv
from .sampler_suite import (
    DEFAULT_PROVIDERS,
    PROVIDERS,
    QUICK_PROVIDERS,
    SamplerBenchSettings,
    format_table,
    run_sampler_bench,
)
from .timing import Timing, measure, synchronize
from .update_suite import UpdateBenchSettings, format_update_table, run_update_bench

__all__ = [
    "CONFIGS",
    "CSV_COLUMNS",
    "DEFAULT_PROVIDERS",
    "PROVIDERS",
    "QUICK_PROVIDERS",
    "BenchConfig",
    "Environment",
    "Row",
    "SamplerBenchSettings",
    "Timing",
    "UpdateBenchSettings",
    "append_csv",
    "build_models",
    "format_table",
    "format_update_table",
    "get_config",
    "measure",
    "read_csv",
    "run_sampler_bench",
    "run_update_bench",
    "synchronize",
]
