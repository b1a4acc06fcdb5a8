"""``cpsample sample`` with diffusers conditioning: --class-labels, --prompt/--guidance-scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers_tiny import H, tiny_unet  # noqa: E402
from test_diffusers_sd import LATENT, SIZE, tiny_sd_pipe  # noqa: E402

from cpsample_fast import CPSampler  # noqa: E402
from cpsample_fast.cli.__main__ import main as cli_main  # noqa: E402
from cpsample_fast.diffusers.conditioning import CFGEpsModel, TextToImage  # noqa: E402
from cpsample_fast.integrations.diffusers import DiffusersEpsModel  # noqa: E402
from cpsample_fast.schedule import NoiseSchedule  # noqa: E402


def _class_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=H,
        in_channels=1,  # the PNG grid takes 1 or 3 channels
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        num_class_embeds=3,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def test_cfg_eps_model_in_cpsampler_equals_stable_diffusion_pipeline():
    pipe = tiny_sd_pipe()
    prompts = ["a cat", "cat"]
    latents = torch.randn(2, LATENT, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    want = pipe(
        prompt=prompts, guidance_scale=3.0, num_inference_steps=3, latents=latents,
        output_type="latent",
    ).images  # fmt: skip
    model = CFGEpsModel(pipe.unet, guidance_scale=3.0)
    enc = pipe.encode_prompt(prompts, "cpu", 1, True)  # (cond, uncond)
    model.set_condition(enc[0], enc[1])
    schedule = NoiseSchedule.from_diffusers(pipe.scheduler)
    got = CPSampler(model, None, schedule, num_inference_steps=3, backend="torch").sample(
        latents.shape, noise=latents
    )
    assert (got - want).abs().max().item() <= 1e-5


def test_cli_prompt_decodes_through_the_vae(tmp_path, capsys):
    pipe = tiny_sd_pipe()
    pipe.save_pretrained(tmp_path / "sd", safe_serialization=True)
    t2i = TextToImage(tmp_path / "sd", device="cpu", guidance_scale=3.0)
    ids = t2i.tokenizer(["a cat"]).input_ids
    assert ids == pipe.tokenizer(["a cat"]).input_ids
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tmp_path / "sd"), "--prompt", "a cat", "cat"]
    argv += ["--guidance-scale", "3", "--num-samples", "3", "--batch-size", "2", "--steps", "2"]
    argv += ["--no-progress", "--out", str(out)]
    assert cli_main(argv) == 0
    samples = np.load(out / "samples.npz")["samples"]
    assert samples.shape == (3, 3, 2 * SIZE, 2 * SIZE) and np.isfinite(samples).all()
    assert np.abs(samples).max() <= 1
    assert cli_main([*argv[:-1], str(tmp_path / "o2"), "--class-labels", "1"]) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_cli_class_labels_per_sample(tmp_path, capsys):
    unet = _class_unet()
    diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(
        tmp_path / "cls", safe_serialization=True
    )
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tmp_path / "cls"), "--class-labels", "0", "2"]
    argv += ["--num-samples", "3", "--batch-size", "2", "--steps", "2", "--seed", "5"]
    assert cli_main([*argv, "--no-progress", "--out", str(out)]) == 0
    got = torch.from_numpy(np.load(out / "samples.npz")["samples"])
    # the same samples, drawn directly with labels [0, 2, 0] (global index i -> Y[i % 2])
    model = DiffusersEpsModel(unet, class_labels=torch.tensor([0, 2, 0]))
    sampler = CPSampler(model, None, NoiseSchedule.from_diffusers(diffusers.DDIMScheduler()),
                        num_inference_steps=2)  # fmt: skip
    want = sampler.sample((3, 1, H, H), seed=5).clamp(-1, 1)
    assert (got - want).abs().max().item() <= 1e-5
    assert cli_main([*argv[:4], "7", "--out", str(tmp_path / "o3")]) == 2
    assert "[0, 3)" in capsys.readouterr().err
    tiny_unet().save_pretrained(tmp_path / "plain" / "unet")
    diffusers.DDIMScheduler().save_pretrained(tmp_path / "plain" / "scheduler")
    assert cli_main(["sample", "--model", str(tmp_path / "plain"), "--class-labels", "1",
                     "--out", str(tmp_path / "o4")]) == 2  # fmt: skip
    assert "class-conditional" in capsys.readouterr().err


def test_bench_diffusers_shows_the_fast_path_inside_from_pipe(tmp_path, capsys):
    import json

    assert cli_main(["bench", "--diffusers", "--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "CPSamplePipeline.from_pipe" in table
    (path,) = tmp_path.glob("bench_diffusers_tiny_cpu_*.json")
    result = json.loads(path.read_text())
    paths = {r["provider"]: r["path"] for r in result["rows"]}
    assert paths["CPSamplePipeline.from_pipe"] == "cpsampler"
    assert paths["ProtectedScheduler switch"] == "scheduler"
    assert result["max_abs_diff_switch_vs_from_pipe"] <= 1e-4
    assert all(r["ms_per_step"] > 0 for r in result["rows"])
