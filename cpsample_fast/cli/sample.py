"""``cpsample sample``: protected sampling to ``.npz`` + PNG + JSON, resumable, torchrun-ready.

Run under ``torchrun --nproc_per_node N -m cpsample_fast sample ...`` to spread batches over N
processes (GPUs): batch ``b`` goes to rank ``b % N`` and sample ``i`` always gets the noise of
``(seed, i)``, so the merged result is the same for any N. A killed job started again skips the
batches already written.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HELP = "draw protected samples (CPSample) from an eps-model; writes samples.npz, grid.png, JSON"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="eps-model: a local diffusers directory, a package UNet checkpoint (.safetensors "
        "with its .json sidecar), or 'digits' for the shipped memorising digits UNet",
    )
    p.add_argument("--protector", help="protector checkpoint (.safetensors or its folder)")
    p.add_argument("--num-samples", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=1000.0, help="guidance scale s (default 1000)")
    p.add_argument("--alpha", type=float, default=0.001, help="gate threshold α (default 0.001)")
    p.add_argument("--mode", default="repel", choices=["repel", "attract", "entropy"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--settings",
        help="settings JSON from `cpsample tune`: its mode/alpha/scale/guidance range/steps/eta "
        "replace those options; refused unless tuned for this --model and --protector",
    )
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "cpp", "torch"])
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
    p.add_argument("--no-resume", action="store_true", help="redo batches already on disk")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output folder")


def load_eps_model(spec: str, device):
    """``(eps_model, schedule)`` from a diffusers dir, a package UNet checkpoint or 'digits'."""
    from ..schedule import NoiseSchedule

    path = Path(spec)
    if spec == "digits":
        from ..models import load_digits_unet

        model, meta = load_digits_unet()
        return model.to(device), NoiseSchedule.from_config(meta["schedule"])
    if path.is_dir():
        from ..integrations.diffusers import load_diffusers

        return load_diffusers(path, device=device)
    if path.suffix == ".safetensors":
        from ..models import load_unet

        model, meta = load_unet(path)
        if "schedule" not in meta:
            raise ValueError(f"{path}: its metadata must hold the training 'schedule'")
        return model.to(device), NoiseSchedule.from_config(meta["schedule"])
    raise ValueError(
        f"--model must be a diffusers directory, a .safetensors UNet checkpoint or 'digits', "
        f"got {spec!r}"
    )


def main(args) -> int:
    from ..distributed import (
        RankInfo,
        barrier,
        batch_plan,
        check_manifest,
        init_process_group,
        merge_shards,
        shard_path,
        write_shard,
    )
    from ..eval.plots import save_image_grids, save_lines_png
    from ..io import ensure_writable_dir, write_json_atomic
    from ..protector import load_protector
    from ..sampler import CPSampler

    info = RankInfo.from_env()
    device = info.device(args.device)
    own_group = init_process_group(info, device)
    out = ensure_writable_dir(args.out, "--out")
    eps_model, schedule = load_eps_model(args.model, device)
    protector = None
    if args.protector:
        protector, meta = load_protector(args.protector, device=device)
        if meta.get("schedule") and not _same_schedule(meta["schedule"], schedule):
            print("warning: the protector was trained with a different noise schedule")
    if args.settings:
        try:
            if protector is None:
                raise ValueError("--settings needs --protector (the settings are tuned for one)")
            _apply_settings(args, eps_model, protector, meta)
        except (ValueError, FileNotFoundError) as err:
            print(f"cpsample sample: {err}", file=sys.stderr)
            return 2
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
    )
    shape_chw = _sample_shape(eps_model, protector)
    check_manifest(out, _manifest(args, shape_chw), info, resume=not args.no_resume)
    plan = batch_plan(args.num_samples, args.batch_size, info)
    todo = [b for b in plan if args.no_resume or not shard_path(out, b[0]).is_file()]
    if info.rank == 0:
        every = batch_plan(args.num_samples, args.batch_size, RankInfo())  # all ranks' batches
        done_before = 0 if args.no_resume else sum(shard_path(out, b).is_file() for b, *_ in every)
        print(
            f"cpsample sample: {args.num_samples} samples {shape_chw}, {args.steps} steps, "
            f"{'protected' if protector is not None else 'plain DDIM'}, device {device}, "
            f"{info.world_size} rank(s); {done_before} of {len(every)} batches already done"
        )
    from tqdm import tqdm

    t0 = time.perf_counter()
    done = 0
    for b, start, size in tqdm(todo, disable=args.no_progress or info.rank != 0, desc="batches"):
        x, trace = sampler.sample(
            (size, *shape_chw),
            seed=args.seed,
            sample_offset=start,
            return_trace=True,
            device=device,
        )
        write_shard(
            out,
            b,
            {
                "samples": x.float().clamp(-1, 1),
                "gate": trace.gate.T.contiguous().to(torch.uint8),  # [size, steps]
                "confidence": trace.confidence.T.contiguous(),  # [size, steps]
            },
            {"seed": args.seed, "first_sample": start},
        )
        done += size
    elapsed = time.perf_counter() - t0
    barrier(info)
    if info.rank == 0:
        merged = merge_shards(out, args.num_samples, args.batch_size)
        np.savez(out / "samples.tmp.npz", **merged)
        (out / "samples.tmp.npz").replace(out / "samples.npz")
        samples = torch.from_numpy(merged["samples"])
        save_image_grids({"samples": samples[:64]}, out / "grid.png")
        gate = merged["gate"].astype(np.float64)  # [N, steps]
        conf = merged["confidence"]  # NaN where the protector was not run
        steps = np.arange(args.steps)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_conf = np.nanmean(conf, 0)
        save_lines_png(
            {"fraction guided": (steps, gate.mean(0)), "mean confidence q": (steps, mean_conf)},
            out / "trace.png",
            xlabel="step",
            ylabel="value",
            title="guidance per step",
        )
        result = {
            "model": args.model,
            "protector": args.protector,
            "num_samples": args.num_samples,
            "steps": args.steps,
            "eta": args.eta,
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
            "rank0_seconds": elapsed,
            "rank0_images_per_second": done / elapsed if done and elapsed > 0 else None,
            "fraction_of_samples_ever_guided": float((gate.max(1) > 0).mean()),
            "mean_fraction_guided_per_step": gate.mean(0).tolist(),
            "files": ["samples.npz", "grid.png", "trace.png"],
        }
        write_json_atomic(out / "sample.json", result)
        print(f"wrote {out}: samples.npz ({args.num_samples}), grid.png, trace.png, sample.json")
    if own_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _apply_settings(args, eps_model, protector, protector_meta) -> None:
    """Replace the sampler options by a tuned settings file's, after checking its identity
    (before any dtype / layout change: the hashes are of the weights as loaded)."""
    from ..settings import load_settings

    s = load_settings(
        args.settings, eps_model=eps_model, protector=protector, protector_meta=protector_meta
    )["sampler"]
    args.mode, args.alpha, args.scale = s["mode"], s["alpha"], s["scale"]
    args.steps, args.eta, args.guidance_range = (
        s["num_inference_steps"],
        s["eta"],
        s["guidance_range"],
    )


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
    if getattr(args, "guidance_range", None) is not None:
        manifest["guidance_range"] = list(args.guidance_range)
    manifest["shape"] = list(shape_chw)
    if args.use_clipped_model_output:  # only when set: earlier runs' manifests stay valid
        manifest["use_clipped_model_output"] = True
    for k in ("model", "protector"):
        value = getattr(args, k)
        if value and Path(value).exists():
            manifest[f"{k}_files"] = _file_stamp(Path(value))
    return manifest


def _same_schedule(config: dict, schedule) -> bool:
    """Whether a stored schedule config describes the same training schedule."""
    from ..schedule import NoiseSchedule

    other = NoiseSchedule.from_config(config)
    return bool(torch.equal(other.alphas_cumprod, schedule.alphas_cumprod))


def _sample_shape(eps_model, protector) -> tuple[int, int, int]:
    """``(C, H, W)`` from the model's config (package UNet or diffusers UNet)."""
    cfg = getattr(eps_model, "config", None)
    unet = getattr(eps_model, "unet", None)
    if unet is not None:
        cfg = unet.config
    if cfg is not None:
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        c = get("in_channels") or get("channels")
        s = get("sample_size") or get("resolution") or get("image_size")
        if c and s:
            s = s if isinstance(s, (tuple, list)) else (s, s)
            return int(c), int(s[0]), int(s[1])
    raise ValueError("cannot tell the sample shape (C, H, W) from the model's config")
