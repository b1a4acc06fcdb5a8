"""Benchmark harness shared by ``cpsample bench`` and ``benchmarks/`` (pytest-benchmark).

- :mod:`.timing`: warm-up, device synchronisation, median / p20 / p80 over repeats;
- :mod:`.records`: the one CSV schema (benchmarks/README.md) and the run's environment;
- :mod:`.configs`: named configurations (``tiny``, ``cifar``, ``gpu35m``) and their models;
- :mod:`.providers`: the sampling providers (reference, fused, compiled, bf16, CUDA graphs);
- :mod:`.context`: a run's settings, models, shared ``x_T`` and one sampling call per provider;
- :mod:`.accuracy`: each provider against the reference and a float64 baseline;
- :mod:`.pieces`: eps-model, protector and update timed alone (where a step's time goes);
- :mod:`.sampler_suite`: every sampling provider of a configuration, in one process;
- :mod:`.report`: the sampling suite's CSV rows, table and JSON summary;
- :mod:`.update_suite`: the fused update alone per backend, GB/s against a measured copy.
"""

from .configs import CONFIGS, BenchConfig, build_models, get_config
from .context import SamplerBenchSettings, SamplingContext
from .providers import DEFAULT_PROVIDERS, PROVIDERS, QUICK_PROVIDERS, ProviderSpec, parse_providers
from .records import CSV_COLUMNS, Environment, Row, append_csv, read_csv
from .report import format_table
from .sampler_suite import run_sampler_bench
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
    "ProviderSpec",
    "Row",
    "SamplerBenchSettings",
    "SamplingContext",
    "Timing",
    "UpdateBenchSettings",
    "append_csv",
    "build_models",
    "format_table",
    "format_update_table",
    "get_config",
    "measure",
    "parse_providers",
    "read_csv",
    "run_sampler_bench",
    "run_update_bench",
    "synchronize",
]
