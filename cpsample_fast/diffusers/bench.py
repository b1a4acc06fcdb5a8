"""``cpsample bench --diffusers``: diffusers' DDIMPipeline vs the one-line switch vs ``from_pipe``.

Times, on a random ``UNet2DModel`` and ``ProtectorNet`` of the chosen size (nothing is
downloaded):

- ``diffusers DDIMPipeline``: the unprotected pipeline;
- ``ProtectedScheduler switch``: the same pipeline after
  ``pipe.scheduler = ProtectedScheduler(pipe.scheduler, ...)`` (eager diffusers loop + guidance);
- ``CPSamplePipeline.from_pipe``: the protected pipeline, which runs the fused ``CPSampler``
  loop under DDIM (the table's ``path`` column says which loop ran) — eager, and compiled with
  ``--diffusers-compile``.

Both protected paths start from the same ``generator``; the table reports their max abs
difference (they compute the same steps, docs/ALGORITHM.md §3).
"""

from __future__ import annotations

import torch

from ..bench.timing import measure

# (sample size, channels, block_out_channels, layers per block, protector width)
SIZES = {
    "tiny": (8, 3, (16, 32), 1, 8),
    "cifar": (32, 3, (64, 128, 128), 2, 32),
    "256": (256, 3, (64, 128, 256, 256, 512), 2, 64),
}


def build(size: str, device, seed: int = 0):
    """``(pipe, protector)``: a random DDIMPipeline and a ProtectorNet of matching shape."""
    import diffusers

    from ..protector.model import ProtectorNet

    res, ch, blocks, layers, width = SIZES[size]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=res,
        in_channels=ch,
        out_channels=ch,
        block_out_channels=blocks,
        layers_per_block=layers,
        norm_num_groups=min(32, blocks[0] // 2),
        down_block_types=("DownBlock2D",) * len(blocks),
        up_block_types=("UpBlock2D",) * len(blocks),
    )
    unet = unet.to(device).eval().requires_grad_(False)
    prot = ProtectorNet(in_channels=ch, resolution=res, base_channels=width)
    prot = prot.to(device).eval().requires_grad_(False)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, prot


def run(
    *,
    size: str = "tiny",
    device="cpu",
    batch: int = 4,
    steps: int = 10,
    repeats: int = 3,
    warmup: int = 1,
    scale: float = 2.0,
    alpha: float = 0.5,
    compile: bool = False,
    progress=None,
) -> dict:
    """Time the providers; returns ``{"rows": [...], "settings": {...}, "max_abs_diff": x}``."""
    from .pipeline import CPSamplePipeline
    from .scheduler import ProtectedScheduler

    device = torch.device(device)
    pipe, prot = build(size, device)
    kw = dict(batch_size=batch, num_inference_steps=steps, output_type="pt")

    def gen():
        return torch.Generator(device=device).manual_seed(0)

    rows, outputs = [], {}

    def time_it(name, fn, path):
        if progress is not None:
            progress(name)
        timing, out = measure(fn, repeats=repeats, warmup=warmup, device=device)
        outputs[name] = out
        rows.append(
            {
                "provider": name,
                "path": path(),
                "ms_per_step": 1e3 * timing.median / steps,
                "ms_per_step_p20": 1e3 * timing.p20 / steps,
                "ms_per_step_p80": 1e3 * timing.p80 / steps,
                "images_per_s": batch / timing.median,
            }
        )

    inner = pipe.scheduler
    time_it("diffusers DDIMPipeline", lambda: pipe(generator=gen(), **kw).images, lambda: "-")
    pipe.scheduler = ProtectedScheduler(inner, prot, scale=scale, alpha=alpha)
    time_it(
        "ProtectedScheduler switch",
        lambda: pipe(generator=gen(), **kw).images,
        lambda: "scheduler",
    )
    pipe.scheduler = inner
    fast = CPSamplePipeline.from_pipe(pipe, protector=prot, scale=scale, alpha=alpha)
    fast.set_progress_bar_config(disable=True)
    time_it("CPSamplePipeline.from_pipe", lambda: fast(generator=gen(), **kw).images,
            lambda: fast.last_path)  # fmt: skip
    if compile:
        comp = CPSamplePipeline.from_pipe(
            pipe, protector=prot, scale=scale, alpha=alpha, compile=True
        )
        comp.set_progress_bar_config(disable=True)
        time_it("from_pipe, compile=True", lambda: comp(generator=gen(), **kw).images,
                lambda: comp.last_path)  # fmt: skip
    diff = (outputs["ProtectedScheduler switch"] - outputs["CPSamplePipeline.from_pipe"]).abs()
    return {
        "settings": {
            "size": size,
            "device": str(device),
            "batch": batch,
            "steps": steps,
            "repeats": repeats,
            "scale": scale,
            "alpha": alpha,
            "compile": compile,
        },
        "rows": rows,
        "max_abs_diff_switch_vs_from_pipe": float(diff.max()),
        "gate_fraction": float(fast.trace.gate.float().mean()) if fast.trace is not None else 0.0,
    }


def format_table(result: dict) -> str:
    s = result["settings"]
    head = (
        f"diffusers bench: size={s['size']} batch={s['batch']} steps={s['steps']} "
        f"device={s['device']} scale={s['scale']} alpha={s['alpha']}"
    )
    lines = [head, f"{'provider':<28} {'path':<10} {'ms/step':>9} {'img/s':>8}"]
    for r in result["rows"]:
        ms, ips = r["ms_per_step"], r["images_per_s"]
        lines.append(f"{r['provider']:<28} {r['path']:<10} {ms:>9.2f} {ips:>8.2f}")
    lines.append(
        "max |switch − from_pipe| (same generator): "
        f"{result['max_abs_diff_switch_vs_from_pipe']:.2e}; "
        f"fraction of (step, sample) guided: {result['gate_fraction']:.2f}"
    )
    return "\n".join(lines)
