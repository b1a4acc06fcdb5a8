"""``cpsample bench``: time reference vs fast paths in one process; print one table; CSV + JSON.

Example: ``OMP_NUM_THREADS=2 cpsample bench --config cifar --repeats 5 --out bench_out``.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

HELP = (
    "Benchmark the reference and the fast sampler (eager, compiled, bf16, CUDA graphs) and the "
    "fused update; print one table, append CSV rows and write JSON."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cpsample bench``."""
    from ..bench import CONFIGS, PROVIDERS

    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default=None,
        help="model configuration (default: gpu35m on cuda, cifar on cpu; tiny with --quick)",
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (config default)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (config default)")
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"sampling providers, space or comma separated; known: {', '.join(PROVIDERS)}",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls (default 1)")
    parser.add_argument(
        "--suite",
        choices=("sampler", "update", "all", "matched"),
        default="all",
        help="sampling providers, the fused update alone, or both (default); 'matched': the "
        "quality-matched table, protected DDIM-50 vs DPM-Solver++ on the demo digits model",
    )
    parser.add_argument(
        "--matched-steps",
        type=int,
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
    parser.add_argument("--scale", type=float, default=2.0, help="guidance scale s (default 2)")
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="gate threshold (default 0.5: the untrained protector guides every step, so the "
        "guided path is what is timed)",
    )
    parser.add_argument("--backend", default="auto", help="fused-update backend of CPSampler")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the float64 reference")
    parser.add_argument(
        "--accuracy-batch",
        type=int,
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

    def close(self) -> None:
        """End the bar."""
        if self.bar is not None:
            self.bar.close()


def _check_positive(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"--{name} must be a positive integer, got {value!r}")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; returns 0, or 1 when any provider failed."""
    from ..bench import (
        Environment,
        SamplerBenchSettings,
        UpdateBenchSettings,
        append_csv,
        format_table,
        format_update_table,
        get_config,
        run_sampler_bench,
        run_update_bench,
    )
    from ..bench.sampler_suite import parse_providers, summary
    from ..bench.update_suite import DEFAULT_SIZES, QUICK_SIZES
    from ..io import ensure_writable_dir, write_json_atomic

    for name in ("batch", "steps", "repeats", "accuracy_batch"):
        _check_positive(name, getattr(args, name))
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")
    if args.diffusers:
        return _diffusers_bench(args, device)
    if args.config is not None:
        config = get_config(args.config)
    else:
        default = "tiny" if args.quick else ("gpu35m" if device.type == "cuda" else "cifar")
        config = get_config(default)
    sizes = None
    if args.suite == "matched":
        _check_positive("matched-steps", args.matched_steps)
        if args.config is not None:
            raise ValueError("--suite matched runs the demo digits model; drop --config")
    if args.suite in ("update", "all"):
        if args.sizes:
            sizes = tuple(int(v) for v in args.sizes)
            if any(v < 1 for v in sizes):
                raise ValueError(f"--sizes must be positive element counts, got {args.sizes}")
        else:
            sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES[device.type]
    providers = parse_providers(args.providers, device, quick=args.quick)
    out_dir = ensure_writable_dir(args.out, "--out") if args.out else None
    env = Environment.capture(device)
    repeats = args.repeats or (2 if args.quick else 3)

    records: list[dict] = []
    tables: list[str] = []
    report: dict = {"environment": env.__dict__, "argv": vars(args_for_json(args))}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    csv_path = json_path = None
    if out_dir is not None:
        csv_path = out_dir / "bench.csv"
        name = "matched" if args.suite == "matched" else config.name
        json_path = out_dir / f"bench_{name}_{device.type}_{stamp}.json"

    def flush(rows) -> None:
        # Each provider's rows reach the CSV and the JSON as soon as it is measured, so a run
        # cut short by a time limit keeps what it measured.
        new = [row.to_record(env) for row in rows]
        records.extend(new)
        if out_dir is not None:
            append_csv(csv_path, new)
            write_json_atomic(json_path, {**report, "rows": records, "complete": False})

    failed = False
    bar = _Progress()
    try:
        if args.suite in ("sampler", "all"):
            settings = SamplerBenchSettings(
                config=config,
                device=device,
                batch=args.batch or config.batch,
                steps=args.steps or config.steps,
                providers=providers,
                repeats=repeats,
                warmup=args.warmup,
                scale=args.scale,
                alpha=args.alpha,
                backend=args.backend,
                accuracy=not args.no_accuracy,
                accuracy_batch=args.accuracy_batch,
            )
            result = run_sampler_bench(settings, bar.step, flush)
            tables.append(format_table(result))
            report["sampler"] = summary(result)
            failed |= bool(result.errors)
        if args.suite == "matched":
            from ..bench.matched import run_matched_bench

            matched = run_matched_bench(
                device,
                batch=args.batch or (8 if args.quick else 128),
                dpm_steps=args.matched_steps,
                ddim_steps=args.steps or (4 if args.quick else 50),
                repeats=repeats,
                warmup=args.warmup,
                backend=args.backend,
                progress=bar.step,
            )
            flush(matched.rows)
            tables.append(matched.table)
            report["matched"] = matched.summary
        if sizes is not None:
            usettings = UpdateBenchSettings(
                device=device, sizes=sizes, repeats=max(repeats, 3), compile=not args.quick
            )
            measurements, _rows, errors = run_update_bench(usettings, bar.step, flush)
            tables.append(format_update_table(measurements, errors))
            report["update"] = {
                "settings": usettings.to_dict(),
                "errors": errors,
                "measurements": [
                    {
                        "provider": m.provider,
                        "numel": m.numel,
                        "gbps": m.gbps[0],
                        "frac_of_copy": m.frac_of_copy,
                    }
                    for m in measurements
                ],
            }
            failed |= bool(errors)
    finally:
        bar.close()
    table = "\n\n".join(tables)
    report.update(table=table, rows=records, complete=True)
    if out_dir is not None:
        write_json_atomic(json_path, report)
        print(f"wrote {csv_path} (+{len(records)} rows) and {json_path}", file=sys.stderr)
    print(table, flush=True)
    return 1 if failed else 0


def _diffusers_bench(args: argparse.Namespace, device: torch.device) -> int:
    """``cpsample bench --diffusers``: see :mod:`cpsample_fast.diffusers.bench`."""
    from ..diffusers import bench as dbench
    from ..io import ensure_writable_dir, write_json_atomic

    size = args.diffusers_size or ("tiny" if args.quick or device.type == "cpu" else "cifar")
    bar = _Progress()
    try:
        result = dbench.run(
            size=size,
            device=device,
            batch=args.batch or (2 if args.quick else 8),
            steps=args.steps or (3 if args.quick else 20),
            repeats=args.repeats or (2 if args.quick else 3),
            warmup=args.warmup,
            scale=args.scale,
            alpha=args.alpha,
            compile=args.diffusers_compile,
            progress=bar.step,
        )
    finally:
        bar.close()
    table = dbench.format_table(result)
    if args.out:
        out = ensure_writable_dir(args.out, "--out")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = out / f"bench_diffusers_{size}_{device.type}_{stamp}.json"
        write_json_atomic(path, {**result, "table": table, "argv": vars(args_for_json(args))})
        print(f"wrote {path}", file=sys.stderr)
    print(table, flush=True)
    return 0


def args_for_json(args: argparse.Namespace) -> argparse.Namespace:
    """The parsed options without the dispatcher's private entries (JSON-able)."""
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
