"""``cpsample sample``: outputs, resume after a kill, and rank invariance under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpsample_fast.cli.__main__ import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_tiny_assets):
    """A tiny UNet checkpoint and a (briefly trained) protector, written to disk."""
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    return write_tiny_assets(tmp_path_factory.mktemp("assets"), images, steps=2, batch_size=4)


def _args(assets, out, *extra):
    return [
        "sample", "--model", str(assets / "unet.safetensors"), "--protector",
        str(assets / "protector"), "--num-samples", "5", "--batch-size", "2", "--steps", "3",
        "--eta", "1.0", "--alpha", "0.5", "--scale", "10", "--seed", "4", "--no-progress",
        "--out", str(out), *extra,
    ]  # fmt: skip


def _run(assets, out, *extra):
    assert cli_main(_args(assets, out, *extra)) == 0


def test_sample_writes_outputs_and_resumes(assets, tmp_path):
    out = tmp_path / "run"
    _run(assets, out)
    for name in ("samples.npz", "grid.png", "trace.png", "sample.json"):
        assert (out / name).is_file(), name
    first = np.load(out / "samples.npz")
    assert first["samples"].shape == (5, 1, 16, 16)
    assert np.isfinite(first["samples"]).all()
    assert first["gate"].shape == (5, 3)
    info = json.loads((out / "sample.json").read_text())
    assert (
        info["num_samples"] == 5 and info["fraction_of_samples_ever_guided"] == 1.0
    )  # alpha = 0.5
    # a job killed after some batches: the finished shards stay, the rest is redone
    (out / "samples.npz").unlink()
    (out / "shards" / "batch_000001.safetensors").unlink()
    _run(assets, out)
    again = np.load(out / "samples.npz")
    np.testing.assert_array_equal(again["samples"], first["samples"])


def test_resume_refuses_shards_of_another_run(assets, tmp_path, capsys):
    out = tmp_path / "run"
    _run(assets, out)
    first = np.load(out / "samples.npz")["samples"]
    for changed in (["--batch-size", "3"], ["--seed", "5"], ["--scale", "20"]):
        args = _args(assets, out)
        i = args.index(changed[0])
        args[i + 1] = changed[1]
        assert cli_main(args) == 2
        assert "holds shards of a different run" in capsys.readouterr().err
    # --no-resume redoes every batch under the new settings; the samples do not depend on the
    # batch size (counter-based noise), so they equal the first run's
    args = _args(assets, out, "--no-resume")
    args[args.index("--batch-size") + 1] = "3"
    assert cli_main(args) == 0
    np.testing.assert_allclose(np.load(out / "samples.npz")["samples"], first, atol=1e-5)


def test_torchrun_two_ranks_equal_one_process(assets, tmp_path):
    _run(assets, tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launcher, "--nproc_per_node", "2", "-m", "cpsample_fast"]
    cmd += _args(assets, tmp_path / "multi", "--device", "cpu")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    single = np.load(tmp_path / "single" / "samples.npz")["samples"]
    multi = np.load(tmp_path / "multi" / "samples.npz")["samples"]
    np.testing.assert_allclose(multi, single, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "multi" / "sample.json").read_text())["world_size"] == 2


def test_sample_bad_model_path(tmp_path, capsys):
    assert (
        cli_main(["sample", "--model", str(tmp_path / "nope.bin"), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "--model" in err and len(err.strip().splitlines()) == 1


def test_sample_solver_dpmsolver_equals_the_python_api(assets, tmp_path, capsys):
    """`--solver dpmsolver++` samples what CPSampler(solver="dpmsolver++") samples; a resume
    with the other solver is refused; η > 0 with it is a clear error."""
    from cpsample_fast.models import load_unet
    from cpsample_fast.protector import load_protector
    from cpsample_fast.sampler import CPSampler
    from cpsample_fast.schedule import NoiseSchedule

    out = tmp_path / "dpm"
    args = _args(assets, out, "--solver", "dpmsolver++")
    args[args.index("--eta") + 1] = "0"
    assert cli_main(args) == 0
    got = np.load(out / "samples.npz")["samples"]
    assert json.loads((out / "sample.json").read_text())["solver"] == "dpmsolver++"
    unet, meta = load_unet(assets / "unet.safetensors")
    prot, _ = load_protector(assets / "protector")
    schedule = NoiseSchedule.from_config(meta["schedule"])
    kw = dict(num_inference_steps=3, scale=10.0, alpha=0.5, solver="dpmsolver++")
    sampler = CPSampler(unet, prot, schedule, **kw)
    want = sampler.sample((5, 1, 16, 16), seed=4).clamp(-1, 1)  # saved images lie in [-1, 1]
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
    args_ddim = list(args)
    args_ddim.remove("--solver")
    args_ddim.remove("dpmsolver++")
    assert cli_main(args_ddim) == 2
    assert "different run" in capsys.readouterr().err
    assert cli_main(_args(assets, tmp_path / "bad", "--solver", "dpmsolver++")) == 2
    assert "deterministic" in capsys.readouterr().err
