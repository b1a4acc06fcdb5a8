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
    assert meta["step"] == 6 and set(groups) == {"model", "ema", "opt", "rng"}
    assert groups["rng"]["train"].dtype == torch.uint8
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


def _kill_after(model, n):
    """Make ``model`` raise on its ``n + 1``-th forward call: a run killed mid-step."""
    calls = [0]
    forward = model.forward

    def counted(x, t):
        calls[0] += 1
        if calls[0] > n:
            raise KeyboardInterrupt("simulated kill")
        return forward(x, t)

    model.forward = counted
    return model


def _train_tiny(model, images, steps, **kw):
    return train_diffusion(
        model,
        images,
        NoiseSchedule(),
        steps=steps,
        batch_size=3,  # odd
        lr=3e-3,
        warmup=2,  # shorter than the run, so the cosine part (which depends on steps) is used
        seed=7,
        progress=False,
        log_every=2,
        **kw,
    )


def _fresh_tiny(seed):
    torch.manual_seed(seed)
    return SmallUNet("tiny")


def test_resume_after_kill_is_bitwise_identical(tmp_path):
    torch.set_num_threads(1)
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    n, k = 7, 3
    ref, ref_rep = _train_tiny(_fresh_tiny(0), images, n, checkpoint=tmp_path / "ref.safetensors")
    ref_groups, _ = load_checkpoint(tmp_path / "ref.safetensors")

    # Killed during step k + 1 (checkpoints every 3 steps: the last one is at step 3), then
    # resumed in a new process-like setting: a differently initialised model and global RNG.
    ckpt = tmp_path / "run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _train_tiny(
            _kill_after(_fresh_tiny(0), k + 1), images, n, checkpoint=ckpt, checkpoint_every=3
        )
    _, mid = load_checkpoint(ckpt)
    assert mid["step"] == 3
    torch.manual_seed(123)
    resumed, rep = _train_tiny(_fresh_tiny(5), images, n, checkpoint=ckpt, checkpoint_every=3)
    groups, meta = load_checkpoint(ckpt)
    assert meta["step"] == n
    for group in ("model", "ema", "opt", "rng"):
        errs = {
            name: (groups[group][name].double() - ref_groups[group][name].double()).abs().max()
            for name in ref_groups[group]
        }
        worst = max(errs.values()).item()
        print(group, "max |resumed - uninterrupted|:", worst)
        assert set(groups[group]) == set(ref_groups[group])
        assert all(torch.equal(groups[group][k_], ref_groups[group][k_]) for k_ in errs)
    sd, ref_sd = resumed.state_dict(), ref.state_dict()  # returned models: EMA weights
    assert all(torch.equal(sd[k_], ref_sd[k_]) for k_ in ref_sd)
    assert rep.losses == ref_rep.losses


def test_resume_refuses_other_data_or_settings(tmp_path):
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    ckpt = tmp_path / "m.safetensors"
    _train_tiny(SmallUNet("tiny"), images, 2, checkpoint=ckpt)
    with pytest.raises(ValueError, match="data_sha256"):
        _train_tiny(SmallUNet("tiny"), images.flip(0), 4, checkpoint=ckpt)
    with pytest.raises(ValueError, match="lr"):
        train_diffusion(
            SmallUNet("tiny"),
            images,
            NoiseSchedule(),
            steps=4,
            batch_size=3,
            lr=1.0,
            warmup=2,
            seed=7,
            checkpoint=ckpt,
            progress=False,
        )
    with pytest.raises(ValueError, match="already at step 2"):
        _train_tiny(SmallUNet("tiny"), images, 1, checkpoint=ckpt)
    # resume=False starts over and overwrites.
    _train_tiny(SmallUNet("tiny"), images.flip(0), 1, checkpoint=ckpt, resume=False)
    assert load_checkpoint(ckpt)[1]["step"] == 1


def test_checkpoint_meta_lives_in_the_weights_file(tmp_path):
    """A kill between the weights and the sidecar rename must not mix two steps."""
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    ckpt = tmp_path / "m.safetensors"
    _train_tiny(SmallUNet("tiny"), images, 2, checkpoint=ckpt)
    stale = json.loads(ckpt.with_suffix(".json").read_text())
    _train_tiny(SmallUNet("tiny"), images, 4, checkpoint=ckpt)
    ckpt.with_suffix(".json").write_text(json.dumps(stale))  # as if killed before the sidecar
    groups, meta = load_checkpoint(ckpt)
    assert meta["step"] == 4 and int(groups["opt"]["0.step"]) == 4


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
