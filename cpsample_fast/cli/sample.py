"""``cpsample sample``: protected sampling to ``.npz`` + PNG + JSON, resumable, torchrun-ready.

Run under ``torchrun --nproc_per_node N -m cpsample_fast sample ...`` to spread batches over N
processes (GPUs): batch ``b`` goes to rank ``b % N`` and sample ``i`` always gets the noise of
``(seed, i)``, so the merged result is the same for any N. A killed job started again skips the
batches already written and verified.

Every shard carries the run's identity and a content checksum (:mod:`cpsample_fast.shards`):
resume regenerates a truncated, corrupted or foreign shard, and the merge refuses one. The
output folder is locked for the run; ``sample.json`` (the "finished" marker) is removed when a
run starts and written last. The merge streams shard by shard (never all samples in memory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..distributed import audit_record, merge_run, run_sharded
from ..guidance import MODES
from ..models.loading import load_eps_model
from ..ops import BACKENDS
from ..protector.fit import check_protector_fits
from ..solvers import FINAL_SIGMAS_TYPES, SOLVERS
from . import _args as A

OUTPUTS = ("npz", "shards", "images")
# Files that say "this run is finished"; removed before a run starts, written last.
RESULT_FILES = ("sample.json", "samples.npz", "grid.png", "trace.png")

# ``load_eps_model``, ``audit_record`` and ``merge_run`` live in the library now
# (``models.loading``, ``distributed``); their names stay importable from here.
__all__ = ["HELP", "add_arguments", "audit_record", "load_eps_model", "main", "merge_run"]

HELP = "draw protected samples (CPSample) from an eps-model; writes samples.npz, grid.png, JSON"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="eps-model: a local diffusers directory, a package UNet checkpoint (.safetensors "
        "with its .json sidecar), or 'digits' for the shipped memorising digits UNet",
    )
    p.add_argument("--protector", help="protector checkpoint (.safetensors or its folder)")
    p.add_argument(
        "--num-samples", type=A.int_at_least(1), default=64, help="number of samples (default 64)"
    )
    p.add_argument("--batch-size", type=A.int_at_least(1), default=16)
    p.add_argument("--steps", type=A.int_at_least(1), default=50, help="sampler steps (default 50)")
    p.add_argument("--eta", type=A.finite_float(0.0), default=0.0)
    p.add_argument(
        "--scale", type=A.finite_float(0.0), default=1000.0, help="guidance scale s (default 1000)"
    )
    p.add_argument(
        "--alpha",
        type=A.finite_float(0.0, 0.5, lo_open=True),
        default=0.001,
        help="gate threshold α in (0, 0.5] (default 0.001)",
    )
    p.add_argument(
        "--solver",
        default="ddim",
        choices=SOLVERS,
        help="ddim (default) or dpmsolver++ (diffusers' DPM-Solver++(2M); needs --eta 0 and "
        "--steps >= 2; reaches DDIM-50's quality in fewer steps)",
    )
    p.add_argument(
        "--final-sigmas-type",
        default="zero",
        choices=FINAL_SIGMAS_TYPES,
        help="dpmsolver++ only, as diffusers: the last step lands on sigma 0 (zero, default) or "
        "on sigma at t = 0 (sigma_min)",
    )
    p.add_argument("--mode", default="repel", choices=MODES)
    p.add_argument("--seed", type=A.seed, default=0, help="noise seed in [0, 2**64)")
    p.add_argument(
        "--settings",
        help="settings JSON from `cpsample tune`: its mode/alpha/scale/guidance range/steps/eta "
        "replace those options; refused unless tuned for this --model and --protector",
    )
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--compile", action="store_true", help="torch.compile the whole step")
    p.add_argument("--bf16", action="store_true", help="run both models in bfloat16")
    p.add_argument("--channels-last", action="store_true", help="models in channels_last")
    p.add_argument(
        "--use-clipped-model-output",
        action="store_true",
        help="derive the direction term's eps from the clipped x0 on every step, as diffusers' "
        "DDIMScheduler.step(use_clipped_model_output=True)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument(
        "--output",
        default="npz",
        choices=OUTPUTS,
        help="npz: merge into samples.npz (default); shards: keep only the verified shards + "
        "manifest (for millions of samples); images: also one PNG per sample under images/",
    )
    p.add_argument("--no-resume", action="store_true", help="delete old shards, redo every batch")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder")
    c = p.add_argument_group("conditioning (diffusers models)")
    c.add_argument(
        "--class-labels",
        type=int,
        nargs="+",
        default=None,
        metavar="Y",
        help="class labels of a class-conditional UNet2DModel; sample i gets Y[i %% len(Y)]",
    )
    c.add_argument(
        "--prompt",
        nargs="+",
        default=None,
        help="prompts for a Stable Diffusion style --model directory (sample i gets "
        "PROMPT[i %% len]); samples are the VAE-decoded images",
    )
    c.add_argument("--negative-prompt", nargs="+", default=None, help="as --prompt, for CFG")
    c.add_argument(
        "--guidance-scale",
        type=float,
        default=7.5,
        help="classifier-free guidance scale with --prompt (default 7.5; <= 1 turns CFG off)",
    )


def main(args) -> int:
    from ..distributed import RankInfo, init_process_group

    info = RankInfo.from_env()
    device = info.device(args.device)
    own_group = init_process_group(info, device)
    try:
        return _run(args, info, device)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, info, device) -> int:
    from ..io import ensure_writable_dir
    from ..models import sample_shape
    from ..shards import new_manifest

    # everything that can be refused is checked before the folder is touched
    out = ensure_writable_dir(args.out, "--out")
    eps_model, protector, t2i, sampler = _load_sampler(args, device)
    shape_chw = sample_shape(eps_model)
    if protector is not None:
        check_protector_fits(
            protector, shape_chw, name="--protector", resolution="warn", warn=_warn
        )
    manifest = new_manifest(_manifest(args, shape_chw), args.num_samples, args.batch_size)

    def sample_batch(start: int, size: int) -> dict[str, torch.Tensor]:
        _condition_batch(args, eps_model, t2i, start, size, device)
        x, trace = sampler.sample((size, *shape_chw), seed=args.seed, sample_offset=start,
                                  return_trace=True, device=device)  # fmt: skip
        if t2i is not None:
            x = t2i.decode(x)  # latents -> images in [-1, 1]
        return audit_record(x, trace, start)

    def announce(done_before: int) -> None:
        print(
            f"cpsample sample: {args.num_samples} samples {shape_chw}, {args.steps} steps, "
            f"{'protected' if protector is not None else 'plain DDIM'}, device {device}, "
            f"{info.world_size} rank(s); {done_before} of {manifest['num_batches']} batches "
            "already done (verified)"
        )

    stats = run_sharded(sample_batch, out, manifest, info=info, seed=args.seed,
                        output=args.output, resume=not args.no_resume,
                        progress=not args.no_progress, result_files=RESULT_FILES,
                        announce=announce, warn=_warn)  # fmt: skip
    if stats is not None:  # rank 0: the run is merged
        _write_result(args, out, sampler, info, device, manifest["run_id"], stats)
    return 0


def _load_sampler(args, device):
    """``(eps_model, protector or None, text-to-image wrapper or None, CPSampler)``, with
    ``--settings`` applied and the models in the requested dtype / memory format."""
    from ..models import load_eps_model
    from ..protector import load_protector
    from ..sampler import CPSampler

    t2i = None
    if args.prompt:
        if args.class_labels:
            raise ValueError("--prompt and --class-labels cannot be combined")
        from ..diffusers.conditioning import TextToImage

        t2i = TextToImage(args.model, device=device, guidance_scale=args.guidance_scale)
        eps_model, schedule = t2i.eps_model, t2i.schedule
    else:
        if args.negative_prompt:
            raise ValueError("--negative-prompt needs --prompt")
        eps_model, schedule = load_eps_model(args.model, device)
        if args.class_labels:
            _check_class_labels(eps_model, args.class_labels)
    protector = None
    if args.protector:
        protector, meta = load_protector(args.protector, device=device)
        if meta.get("schedule") and not _same_schedule(meta["schedule"], schedule):
            _warn("the protector was trained with a different noise schedule")
    if args.settings:
        if protector is None:
            raise ValueError("--settings needs --protector (the settings are tuned for one)")
        _apply_settings(args, eps_model, protector, meta)
    dtype = torch.bfloat16 if args.bf16 else None
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for m in (eps_model, protector):
        if isinstance(m, torch.nn.Module) and (dtype is not None or args.channels_last):
            m.to(dtype=dtype, memory_format=memory_format)
    sampler = CPSampler(
        eps_model,
        protector,
        schedule,
        guidance_range=getattr(args, "guidance_range", None),
        num_inference_steps=args.steps,
        eta=args.eta,
        scale=args.scale if protector is not None else 0.0,
        alpha=args.alpha,
        mode=args.mode,
        backend=args.backend,
        compile=args.compile,
        use_clipped_model_output=args.use_clipped_model_output,
        solver=args.solver,
        final_sigmas_type=args.final_sigmas_type,
    )
    return eps_model, protector, t2i, sampler


def _write_result(args, out: Path, sampler, info, device, run: str, stats: dict) -> None:
    """``sample.json``, written last: the run is finished."""
    from ..io import write_json_atomic

    result = {
        "model": args.model,
        "protector": args.protector,
        "num_samples": args.num_samples,
        "steps": args.steps,
        "eta": args.eta,
        "solver": args.solver,
        "final_sigmas_type": args.final_sigmas_type,
        "scale": sampler.scale,
        "alpha": args.alpha,
        "mode": args.mode,
        "guidance_range": getattr(args, "guidance_range", None),
        "settings": args.settings,
        "seed": args.seed,
        "backend": args.backend,
        "compile": args.compile,
        "bf16": args.bf16,
        "use_clipped_model_output": args.use_clipped_model_output,
        "world_size": info.world_size,
        "device": str(device),
        "run_id": run,
        "output": args.output,
        "class_labels": args.class_labels,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "guidance_scale": args.guidance_scale if args.prompt else None,
        **stats,
    }
    write_json_atomic(out / "sample.json", result)
    print(f"wrote {out}: {', '.join(stats['files'])}, sample.json")


def _warn(message: str) -> None:
    print(f"cpsample sample: warning: {message}", file=sys.stderr)


def _apply_settings(args, eps_model, protector, protector_meta) -> None:
    """Replace the sampler options by a tuned settings file's, after checking its identity
    (before any dtype / layout change: the hashes are of the weights as loaded)."""
    from ..settings import load_settings

    s = load_settings(
        args.settings, eps_model=eps_model, protector=protector, protector_meta=protector_meta
    )["sampler"]
    args.mode, args.alpha, args.scale = s["mode"], s["alpha"], s["scale"]
    args.steps, args.eta, args.guidance_range, args.solver = (
        s["num_inference_steps"],
        s["eta"],
        s["guidance_range"],
        s["solver"],
    )
    args.final_sigmas_type = s["final_sigmas_type"]


def _file_stamp(path: Path) -> list:
    """Identity of a model file or folder for the resume manifest: (name, size, mtime) of each
    file, cheap even for multi-GB weights."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size,
             f.stat().st_mtime_ns] for f in files if f.exists()]  # fmt: skip


def _manifest(args, shape_chw) -> dict:
    """Every setting that shapes the samples of a run (what resuming must not change)."""
    keys = ("model", "protector", "num_samples", "batch_size", "steps", "eta", "scale", "alpha",
            "mode", "seed", "bf16", "channels_last")  # fmt: skip
    manifest = {k: getattr(args, k) for k in keys}
    for k in ("class_labels", "prompt", "negative_prompt", "guidance_scale"):
        if getattr(args, "prompt", None) or (k == "class_labels" and args.class_labels):
            manifest[k] = getattr(args, k)  # only when used: old manifests stay valid
    if getattr(args, "guidance_range", None) is not None:
        manifest["guidance_range"] = list(args.guidance_range)
    manifest["shape"] = list(shape_chw)
    if args.use_clipped_model_output:  # only when set: earlier runs' manifests stay valid
        manifest["use_clipped_model_output"] = True
    if args.solver != "ddim":  # absent for DDIM: runs written before --solver still resume
        manifest["solver"] = args.solver
    if args.final_sigmas_type != "zero":
        manifest["final_sigmas_type"] = args.final_sigmas_type
    for k in ("model", "protector"):
        value = getattr(args, k)
        if value and Path(value).exists():
            path = Path(value).resolve()  # prot, prot/ and /abs/prot are one run
            if k == "protector" and path.is_dir():
                path = path / "protector.safetensors"
            manifest[k] = str(path)
            manifest[f"{k}_files"] = _file_stamp(path)
    return manifest


def _check_class_labels(eps_model, labels) -> None:
    """Clear error before sampling when --class-labels cannot condition this model."""
    unet = getattr(eps_model, "unet", None)
    cfg = getattr(unet, "config", None)
    n = None if cfg is None else cfg.get("num_class_embeds", None)
    if cfg is None or (n is None and cfg.get("class_embed_type", None) is None):
        raise ValueError("--class-labels needs a class-conditional diffusers UNet2DModel --model")
    if n is not None and any(not 0 <= y < n for y in labels):
        raise ValueError(f"--class-labels must lie in [0, {n}), got {labels}")


def _condition_batch(args, eps_model, t2i, start: int, size: int, device) -> None:
    """Per-sample labels/prompts of global samples start … start+size-1 (rank-invariant)."""
    from ..diffusers.conditioning import cycle_slice

    if args.class_labels:
        labels = torch.tensor(cycle_slice(args.class_labels, start, size), device=device)
        eps_model.call_kwargs = {**eps_model.call_kwargs, "class_labels": labels}
    if t2i is not None:
        neg = args.negative_prompt
        t2i.set_prompts(
            cycle_slice(args.prompt, start, size),
            None if neg is None else cycle_slice(neg, start, size),
        )


def _same_schedule(config: dict, schedule) -> bool:
    """Whether a stored schedule config describes the same training schedule."""
    from ..schedule import NoiseSchedule

    other = NoiseSchedule.from_config(config)
    return bool(torch.equal(other.alphas_cumprod, schedule.alphas_cumprod))
