"""``cpsample sample --channels-last`` with 3-channel models (issue 8 item 2): the input gradient
of a channels_last protector comes back channels_last, which the fused update used to refuse."""

from __future__ import annotations

import json

import numpy as np
import torch

from cpsample_fast.cli.__main__ import main as cli_main


def _write_assets(folder):
    from cpsample_fast.models import SmallUNet, UNetConfig, save_checkpoint
    from cpsample_fast.protector import save_protector, train_protector
    from cpsample_fast.schedule import NoiseSchedule

    schedule = NoiseSchedule()
    torch.manual_seed(0)
    config = UNetConfig(in_channels=3, image_size=8, base_channels=8, channel_mults=(1, 2),
                        groups=4)  # fmt: skip
    unet = SmallUNet(config)
    meta = {"unet_config": unet.config.to_dict(), "schedule": schedule.to_config()}
    save_checkpoint(folder / "unet.safetensors", unet, meta)
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    prot, report = train_protector(
        images, schedule=schedule, steps=2, batch_size=4, progress=False,
        protector={"in_channels": 3, "resolution": 8, "base_channels": 8},
    )  # fmt: skip
    save_protector(folder / "protector", prot, report)


def test_sample_channels_last_equals_contiguous(tmp_path):
    _write_assets(tmp_path)
    runs = {}
    for name, extra in (("plain", []), ("cl", ["--channels-last"]),
                        ("cl_bf16", ["--channels-last", "--bf16"])):  # fmt: skip
        out = tmp_path / name
        args = ["sample", "--model", str(tmp_path / "unet.safetensors"), "--protector",
                str(tmp_path / "protector"), "--num-samples", "3", "--batch-size", "3",
                "--steps", "3", "--alpha", "0.5", "--scale", "10", "--seed", "2",
                "--backend", "cpp" if name == "cl" else "auto", "--no-progress",
                "--out", str(out), *extra]  # fmt: skip
        assert cli_main(args) == 0, name
        runs[name] = np.load(out / "samples.npz")["samples"]
        info = json.loads((out / "sample.json").read_text())
        assert info["fraction_of_samples_ever_guided"] == 1.0  # alpha = 0.5: guided
    assert runs["plain"].shape == (3, 3, 8, 8)
    np.testing.assert_allclose(runs["cl"], runs["plain"], rtol=0, atol=1e-5)
    assert np.isfinite(runs["cl_bf16"]).all()
    assert np.abs(runs["cl_bf16"] - runs["plain"]).max() < 0.2  # bf16 models, same samples
