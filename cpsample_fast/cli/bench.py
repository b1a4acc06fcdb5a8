"""``cpsample bench``: time reference vs fast paths in one process; print one table; CSV + JSON.

Parses the options and calls the library (:mod:`cpsample_fast.bench`: ``plan_bench``,
``run_plan``, ``RunLog``). Example:
``OMP_NUM_THREADS=2 cpsample bench --config cifar --repeats 5 --out bench_out``.
"""

from __future__ import annotations

import argparse
import sys

from ._args import finite_float, int_at_least, options

HELP = (
    "Benchmark the reference and the fast sampler (eager, compiled, bf16, CUDA graphs) and the "
    "fused update; print one table, append CSV rows and write JSON."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cpsample bench``."""
    from ..bench import CONFIGS, PROVIDERS
    from ..bench.plan import SUITES

    positive = int_at_least(1)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default=None,
        help="model configuration (default: gpu35m on cuda, cifar on cpu; tiny with --quick)",
    )
    parser.add_argument("--batch", type=positive, default=None, help="batch size (config default)")
    parser.add_argument("--steps", type=positive, default=None, help="DDIM steps (config default)")
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"sampling providers, space or comma separated; known: {', '.join(PROVIDERS)}",
    )
    parser.add_argument("--repeats", type=positive, default=None, help="timed repeats (default 3)")
    parser.add_argument(
        "--warmup", type=int_at_least(0), default=1, help="untimed warm-up calls (default 1)"
    )
    parser.add_argument(
        "--suite",
        choices=SUITES,
        default="all",
        help="sampling providers, the fused update alone, or both (default); 'matched': the "
        "quality-matched table, protected DDIM-50 vs DPM-Solver++ on the demo digits model",
    )
    parser.add_argument(
        "--matched-steps",
        type=positive,
        default=None,
        help="DPM-Solver++ steps of --suite matched (default: the recorded quality-matched count)",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=float,
        default=None,
        help="element counts for the update suite (default 1e5..1e7 on cpu, ..1e8 on cuda)",
    )
    parser.add_argument(
        "--scale", type=finite_float(0.0), default=2.0, help="guidance scale s (default 2)"
    )
    parser.add_argument(
        "--alpha",
        type=finite_float(0.0, 0.5, lo_open=True),
        default=0.5,
        help="gate threshold (default 0.5: the untrained protector guides every step, so the "
        "guided path is what is timed)",
    )
    parser.add_argument("--backend", default="auto", help="fused-update backend of CPSampler")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the float64 reference")
    parser.add_argument(
        "--accuracy-batch",
        type=positive,
        default=8,
        help="samples the float64 reference covers (the first N of the batch; default 8)",
    )
    parser.add_argument("--out", default=None, help="folder for bench.csv (appended) and JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for tests and CI")
    d = parser.add_argument_group("diffusers")
    d.add_argument(
        "--diffusers",
        action="store_true",
        help="instead: DDIMPipeline vs pipe.scheduler = ProtectedScheduler(...) vs "
        "CPSamplePipeline.from_pipe (which loop ran is in the 'path' column)",
    )
    d.add_argument(
        "--diffusers-size", choices=("tiny", "cifar", "256"), default=None, help="UNet size"
    )
    d.add_argument("--diffusers-compile", action="store_true", help="also from_pipe compiled")


class _Progress:
    """A tqdm bar on stderr counting stages (plain lines when tqdm is not installed)."""

    def __init__(self) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=0, desc="cpsample bench", file=sys.stderr, unit="stage")

    def step(self, msg: str) -> None:
        """Count one stage and show what runs now."""
        if self.bar is None:
            print(f"[cpsample bench] {msg}", file=sys.stderr, flush=True)
            return
        self.bar.total += 1
        self.bar.update(1)
        self.bar.set_description(msg[:40])

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# The options that plan_bench takes as they are parsed (--no-accuracy is inverted).
_PLAN_OPTIONS = (
    "suite", "config", "quick", "batch", "steps", "providers", "repeats", "warmup", "scale",
    "alpha", "backend", "accuracy_batch", "sizes", "matched_steps",
)  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; returns 0, or 1 when any provider failed."""
    from ..bench import Environment
    from ..bench.plan import plan_bench, resolve_device, run_plan
    from ..bench.records import RunLog
    from ..io import ensure_writable_dir

    device = resolve_device(args.device)
    if args.diffusers:
        return _diffusers_bench(args, device)
    plan = plan_bench(device, accuracy=not args.no_accuracy, **options(args, *_PLAN_OPTIONS))
    out_dir = ensure_writable_dir(args.out, "--out") if args.out else None
    log = RunLog(Environment.capture(device), out_dir, plan.name, {"argv": _for_json(args)})
    with _Progress() as bar:
        outcome = run_plan(plan, bar.step, log.add)
    log.finish({**outcome.sections, "table": outcome.table})
    if out_dir is not None:
        print(
            f"wrote {log.csv_path} (+{len(log.records)} rows) and {log.json_path}", file=sys.stderr
        )
    print(outcome.table, flush=True)
    return 1 if outcome.failed else 0


def _diffusers_bench(args: argparse.Namespace, device) -> int:
    """``cpsample bench --diffusers``: see :mod:`cpsample_fast.diffusers.bench`."""
    from ..bench.records import report_path
    from ..diffusers import bench as dbench
    from ..io import ensure_writable_dir, write_json_atomic

    size = args.diffusers_size or ("tiny" if args.quick or device.type == "cpu" else "cifar")
    with _Progress() as bar:
        result = dbench.run(
            size=size,
            device=device,
            batch=args.batch or (2 if args.quick else 8),
            steps=args.steps or (3 if args.quick else 20),
            repeats=args.repeats or (2 if args.quick else 3),
            compile=args.diffusers_compile,
            progress=bar.step,
            **options(args, "warmup", "scale", "alpha"),
        )
    table = dbench.format_table(result)
    if args.out:
        out = ensure_writable_dir(args.out, "--out")
        path = report_path(out, f"diffusers_{size}_{device.type}")
        write_json_atomic(path, {**result, "table": table, "argv": _for_json(args)})
        print(f"wrote {path}", file=sys.stderr)
    print(table, flush=True)
    return 0


def _for_json(args: argparse.Namespace) -> dict:
    """The parsed options without the dispatcher's private entries (JSON-able)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}
