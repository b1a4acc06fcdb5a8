"""Profile one provider's sampling call with torch.profiler: what dominates a step.

Usage (after a warm-up call, compilation excluded):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_sampler.py --config cifar \
        --provider fused+compile --rows 25

Prints ``key_averages()`` sorted by self CPU time (CUDA time on a GPU) and the share of the
top-level regions. Uses the same providers and models as ``cpsample bench``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from cpsample_fast.bench import PROVIDERS, SamplerBenchSettings, SamplingContext, get_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cifar")
    parser.add_argument("--provider", default="fused+compile", choices=list(PROVIDERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", default=None, help="also write a Chrome trace here")
    args = parser.parse_args(argv)
    config = get_config(args.config)
    device = torch.device(args.device)
    settings = SamplerBenchSettings(
        config=config,
        device=device,
        batch=args.batch or config.batch,
        steps=args.steps or config.steps,
        providers=[args.provider],
    )
    ctx = SamplingContext(settings)
    run, backend = ctx.make_runner(PROVIDERS[args.provider])
    run()  # warm-up: compilation, allocator
    run()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=False) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(
        f"{args.provider} on {device} ({torch.get_num_threads()} threads), backend {backend}, "
        f"config {config.name}, batch {settings.batch}, {settings.steps} steps"
    )
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
