"""Scale-out evidence (issue 12) with 2 gloo processes under torchrun: ``kill -9`` of any rank
mid-run then resume gives the uninterrupted single-process images; DDP protector training on 2
processes equals 1 process and resumes (under another world size too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cpsample_fast.cli.__main__ import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_tiny_assets):
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    return write_tiny_assets(tmp_path_factory.mktemp("assets"), images, steps=2, batch_size=4)


def _args(assets, out, *extra):
    return [
        "sample", "--model", str(assets / "unet.safetensors"), "--protector",
        str(assets / "protector"), "--num-samples", "24", "--batch-size", "1", "--steps", "10",
        "--eta", "1.0", "--alpha", "0.3", "--scale", "10", "--seed", "11", "--no-progress",
        "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_kill_any_rank_mid_run_then_resume_equals_one_process(assets, tmp_path, victim):
    single = tmp_path / "single"
    assert cli_main(_args(assets, single)) == 0
    want = np.load(single / "samples.npz")["samples"]

    out = tmp_path / "multi"
    proc = subprocess.Popen(
        [*TORCHRUN, "-m", "cpsample_fast", *_args(assets, out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        ranks: dict[int, int] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            ranks = {r: p for p in _children(proc.pid) if (r := _rank_of(p)) is not None}
            if len(ranks) == 2 and len(list((out / "shards").glob("batch_*"))) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None and len(ranks) == 2, "the run ended before it could be killed"
        for p in ranks.values():
            os.kill(p, signal.SIGSTOP)
        written = len(list((out / "shards").glob("batch_*")))
        os.kill(ranks[victim], signal.SIGKILL)
        for r, p in ranks.items():
            if r != victim:
                os.kill(p, signal.SIGCONT)
        log = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(log[-3000:])
    assert proc.returncode != 0
    assert 2 <= written < 24, written  # killed mid-run
    assert not (out / "sample.json").exists()

    # resume with one process (another world size): every verified shard is kept
    assert cli_main(_args(assets, out)) == 0
    np.testing.assert_allclose(np.load(out / "samples.npz")["samples"], want, rtol=0, atol=1e-5)
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 24


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from cpsample_fast.io import save_safetensors_atomic
    from cpsample_fast.protector import train_protector
    from cpsample_fast.schedule import NoiseSchedule

    dist.init_process_group("gloo")
    out, ckpt = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    kw = dict(schedule=NoiseSchedule(), holdout=images[8:], protector={"base_channels": 8},
              batch_size=4, seed=3, label_seed=5, progress=False, checkpoint_dir=ckpt,
              checkpoint_every=2, report_bins=2, report_max_images=4)
    net, _ = train_protector(images[:8], steps=2, **kw)
    half = {k: v.clone() for k, v in net.state_dict().items()}
    net, report = train_protector(images[:8], steps=4, **kw)  # resumes from step 2
    if dist.get_rank() == 0:
        save_safetensors_atomic(out + "/half.safetensors", half)
        save_safetensors_atomic(out + "/final.safetensors", net.state_dict())
        json.dump({"labels": report.labels.tolist(), "fingerprint": report.fingerprint,
                   "steps_run": report.training["steps_run"]}, open(out + "/meta.json", "w"))
    dist.destroy_process_group()
    """
)


def _ddp_kwargs(ckpt):
    from cpsample_fast.schedule import NoiseSchedule

    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    kw = dict(schedule=NoiseSchedule(), holdout=images[8:], protector={"base_channels": 8},
              batch_size=4, seed=3, label_seed=5, progress=False, checkpoint_dir=ckpt,
              checkpoint_every=2, report_bins=2, report_max_images=4)  # fmt: skip
    return images[:8], kw


@pytest.mark.slow
def test_ddp_protector_training_equals_one_process_and_resumes(tmp_path):
    from cpsample_fast.io import load_safetensors
    from cpsample_fast.protector import train_protector

    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    ckpt2 = tmp_path / "ckpt2"
    proc = subprocess.run(
        [*TORCHRUN, str(script), str(tmp_path), str(ckpt2)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.returncode == 0

    members, kw = _ddp_kwargs(tmp_path / "ckpt1")
    net2, _ = train_protector(members, steps=2, **kw)
    half = {k: v.clone() for k, v in net2.state_dict().items()}
    net, report = train_protector(members, steps=4, **kw)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["labels"] == report.labels.tolist()
    assert meta["fingerprint"] == report.fingerprint
    assert meta["steps_run"] == 4
    for name, ref in (("half", half), ("final", net.state_dict())):
        got = load_safetensors(tmp_path / f"{name}.safetensors")
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=f"{name} {k}")
    assert any(not torch.equal(net.state_dict()[k], v) for k, v in half.items())  # it trained

    # the 2-process state resumes in 1 process as if it had never been split
    members, kw = _ddp_kwargs(ckpt2)
    resumed, _ = train_protector(members, steps=6, **kw)
    members, kw = _ddp_kwargs(tmp_path / "ckpt3")
    straight, _ = train_protector(members, steps=6, **kw)
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-5)
