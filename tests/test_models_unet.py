"""SmallUNet configs and train_diffusion (checkpoints, resume, pickle refusal)."""

import json

import pytest
import torch

from cpsample_fast.models import (
    UNET_CONFIGS,
    SmallUNet,
    UNetConfig,
    load_checkpoint,
    train_diffusion,
)
from cpsample_fast.schedule import NoiseSchedule


def test_named_config_sizes():
    sizes = {name: SmallUNet(name).num_parameters() for name in ("tiny", "digits", "cifar-small")}
    print(sizes)
    assert sizes["tiny"] < 100_000
    assert 0.5e6 < sizes["digits"] < 1.5e6
    assert 2e6 < sizes["cifar-small"] < 8e6
    # The benchmark config is only counted, not run (35M parameters).
    n35 = SmallUNet("bench-35m").num_parameters()
    print("bench-35m", n35)
    assert 30e6 < n35 < 40e6


def test_forward_shapes_and_no_batch_mixing():
    torch.manual_seed(0)
    model = SmallUNet(
        UNetConfig(
            in_channels=3,
            image_size=8,
            base_channels=8,
            groups=4,
            channel_mults=(1, 2),
            attention_levels=(1,),
        )
    )
    torch.nn.init.normal_(model.out_conv.weight, std=0.1)  # zero-init would hide mixing
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([5, 500, 999])
    out = model(x, t)
    assert out.shape == x.shape
    single = torch.cat([model(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    err = (out - single).abs().max().item()
    print("batch vs single max error:", err)
    assert err < 1e-5


def test_config_round_trip_and_bad_input():
    cfg = UNET_CONFIGS["cifar-small"]
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="config must be one of"):
        SmallUNet("huge")
    with pytest.raises(ValueError, match="groups"):
        SmallUNet(UNetConfig(base_channels=6, groups=4))
    with pytest.raises(ValueError, match="x must be"):
        SmallUNet("tiny")(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))


def test_train_checkpoint_resume(tmp_path):
    torch.manual_seed(0)
    s = NoiseSchedule()
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    ckpt = tmp_path / "m.safetensors"
    model, rep = train_diffusion(
        SmallUNet("tiny"),
        images,
        s,
        steps=6,
        batch_size=3,
        checkpoint=ckpt,
        checkpoint_every=3,
        progress=False,
        log_every=2,
    )
    groups, meta = load_checkpoint(ckpt)
    assert meta["step"] == 6 and set(groups) == {"model", "ema", "opt"}
    assert len(rep.losses) == 3 and all(loss > 0 for _, loss in rep.losses)
    # Resume to 9 steps: starts from step 6 with the optimiser state restored.
    _, rep2 = train_diffusion(
        SmallUNet("tiny"),
        images,
        s,
        steps=9,
        batch_size=3,
        checkpoint=ckpt,
        checkpoint_every=3,
        progress=False,
        log_every=3,
    )
    groups2, meta2 = load_checkpoint(ckpt)
    assert meta2["step"] == 9
    assert int(groups2["opt"]["0.step"]) == 9
    assert [s for s, _ in rep2.losses] == [2, 4, 6, 9]
    # The returned model carries the EMA weights.
    sd = model.state_dict()
    err = max((sd[k] - groups["ema"][k]).abs().max().item() for k in sd)
    assert err == 0.0


def test_loss_decreases():
    torch.manual_seed(0)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    _, rep = train_diffusion(
        SmallUNet("tiny"),
        images,
        NoiseSchedule(),
        steps=60,
        batch_size=8,
        lr=3e-3,
        warmup=5,
        progress=False,
        log_every=20,
    )
    print(rep.losses)
    assert rep.losses[-1][1] < rep.losses[0][1]


def test_bad_training_input(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        train_diffusion(SmallUNet("tiny"), torch.zeros(0, 1, 16, 16), NoiseSchedule(), steps=1)
    with pytest.raises(ValueError, match="NaN"):
        train_diffusion(
            SmallUNet("tiny"), torch.full((2, 1, 16, 16), float("nan")), NoiseSchedule(), steps=1
        )
    bad = tmp_path / "m.pt"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(bad)
