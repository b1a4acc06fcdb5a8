"""train_protector (docs/ALGORITHM.md §2): memorisation on digits, exact resume, bad input."""

import json
import time

import pytest
import torch

from cpsample_fast.data import load_digits
from cpsample_fast.protector import ProtectorNet, ProtectorReport, train_protector
from cpsample_fast.protector.labels import dataset_fingerprint, draw_labels
from cpsample_fast.protector.report import evaluate_protector
from cpsample_fast.schedule import NoiseSchedule

T = 1000
QUARTER = [0, T // 4]  # the least-noisy quarter of timesteps


@pytest.fixture(scope="module")
def trained():
    """64 digits at 16×16 (upsampling raises the per-pixel SNR under i.i.d. noise, so low-t
    samples separate better than at 8×8: 0.98 vs 0.91 quarter accuracy for the same budget)."""
    torch.set_num_threads(1)
    members = load_digits(64, size=16)
    schedule = NoiseSchedule()
    start = time.perf_counter()
    net, report = train_protector(
        members,
        schedule=schedule,
        protector={"base_channels": 16},
        t_range=QUARTER,  # spend the whole budget where the protector can act
        steps=800,
        batch_size=64,
        lr=5e-3,
        label_seed=0,
        seed=0,
        progress=False,
        report_bins=8,
    )
    seconds = time.perf_counter() - start
    return members, schedule, net, report, seconds


def test_memorises_members_but_not_non_members(trained, tmp_path):
    members, schedule, net, report, seconds = trained
    print(f"training: 800 steps in {seconds:.1f} s (1 thread)")
    print(report.summary())
    acc = [
        evaluate_protector(net, members, report.labels, schedule.alphas_cumprod, QUARTER, seed=s)[
            "accuracy"
        ][0]
        for s in range(8)
    ]
    outsiders = load_digits(64, size=16, offset=128)
    out = [
        evaluate_protector(net, outsiders, None, schedule.alphas_cumprod, QUARTER, seed=s)
        for s in range(4)
    ]
    out_acc = sum(o["accuracy"][0] for o in out) / len(out)
    mean_acc = sum(acc) / len(acc)
    print(f"member accuracy t in [0, 250): mean {mean_acc:.4f} over 8 noise draws {acc}")
    print(f"non-member accuracy vs random labels: {out_acc:.4f}")
    assert mean_acc >= 0.95 and min(acc) >= 0.9
    assert abs(out_acc - 0.5) < 0.15  # chance; 4×64 draws of random labels, σ ≈ 0.03-0.06
    # The report: labels, fingerprint, per-bin numbers, JSON, PNG.
    assert torch.equal(report.labels, draw_labels(64, 0))
    assert report.fingerprint == dataset_fingerprint(members)
    assert report.acting_range() is not None and report.acting_range()[0] == 0
    assert report.member["accuracy"][0] >= 0.95
    assert len(report.member["confidence"]) == len(report.t_edges) - 1 == 8
    text = report.to_json(tmp_path / "report.json")
    back = ProtectorReport.from_dict(json.loads(text))
    assert back.member == report.member and torch.equal(back.labels, report.labels)
    assert (tmp_path / "report.json").read_text().strip() == text
    report.plot(tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _small(**kw):
    args = {
        "schedule": NoiseSchedule(),
        "protector": {"base_channels": 8},
        "steps": 20,
        "batch_size": 7,  # odd
        "lr": 3e-3,
        "progress": False,
        "report_bins": 2,
    }
    args.update(kw)
    return train_protector(load_digits(kw.pop("n", 9), size=8), **args)


class _Killed(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    holdout = load_digits(5, size=8, offset=50)
    ref, ref_report = _small(holdout=holdout, holdout_batch_size=3, seed=3)

    def kill_at_12(step, metrics):
        if step == 12:
            raise _Killed

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Killed):
        _small(
            holdout=holdout,
            holdout_batch_size=3,
            seed=3,
            checkpoint_dir=ckpt,
            checkpoint_every=5,
            callback=kill_at_12,
        )
    # The last checkpoint is step 10: one weights file and its pointer, no temporaries.
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "train_state-000000010.safetensors",
        "train_state.json",
    ]
    resumed_steps = []
    net, report = _small(
        holdout=holdout,
        holdout_batch_size=3,
        seed=3,
        checkpoint_dir=ckpt,
        checkpoint_every=5,
        callback=lambda s, m: resumed_steps.append(s),
    )
    assert resumed_steps == list(range(11, 21))
    err = max(
        (a - b).abs().max().item()
        for a, b in zip(net.state_dict().values(), ref.state_dict().values())
    )
    print("resumed vs uninterrupted max abs weight difference", err)
    assert err <= 1e-6
    assert report.member == ref_report.member
    # A finished run resumes to itself without training.
    again, _ = _small(
        holdout=holdout,
        holdout_batch_size=3,
        seed=3,
        checkpoint_dir=ckpt,
        callback=lambda s, m: pytest.fail("no steps expected"),
    )
    assert all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values())
    )
    # A longer run continues the finished one exactly.
    longer, _ = _small(holdout=holdout, holdout_batch_size=3, seed=3, checkpoint_dir=ckpt, steps=25)
    ref25, _ = _small(holdout=holdout, holdout_batch_size=3, seed=3, steps=25)
    assert all(
        torch.equal(a, b) for a, b in zip(longer.state_dict().values(), ref25.state_dict().values())
    )
    # A different run in the same folder is refused, not silently mixed.
    with pytest.raises(ValueError, match="label_seed"):
        _small(holdout=holdout, holdout_batch_size=3, seed=3, label_seed=1, checkpoint_dir=ckpt)


def test_same_seed_reproduces_and_global_rng_is_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, ra = _small(steps=5, t_weights=torch.linspace(1.0, 0.0, T))
    assert torch.equal(torch.get_rng_state(), before)
    b, rb = _small(steps=5, t_weights=torch.linspace(1.0, 0.0, T))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ra.member == rb.member and ra.training["steps_run"] == 5


def test_bf16_autocast_and_odd_width_run():
    # On CUDA autocast is the default; on the CPU it can be asked for (bf16 autocast on CPU).
    net, report = _small(steps=3, autocast=True, protector={"base_channels": 7})
    assert report.training["autocast_bf16"] and report.training["steps_run"] == 3
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_early_stop_at_target_accuracy():
    _, report = _small(steps=40, target_accuracy=0.05, eval_every=4)
    print("stopped at", report.training["steps_run"], report.training["target_accuracy_measured"])
    assert report.training["stopped_early"] and report.training["steps_run"] == 4


def test_accepts_a_dataset_and_a_custom_module():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 1)

        def forward(self, x, t):
            return self.lin(x.flatten(1))[:, 0] + 0 * t

    x = load_digits(5, size=8)
    net, report = train_protector(
        [x[i] for i in range(5)],
        schedule=NoiseSchedule(),
        protector=Tiny(),
        steps=3,
        batch_size=3,
        progress=False,
        report_bins=2,
    )
    assert isinstance(net, Tiny) and report.fingerprint == dataset_fingerprint(x)


def test_bad_input_is_refused_before_training(tmp_path):
    s = NoiseSchedule()
    good = load_digits(4, size=8)
    kw = {"schedule": s, "steps": 2, "progress": False}
    with pytest.raises(ValueError, match="empty"):
        train_protector(torch.zeros(0, 1, 8, 8), **kw)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        train_protector(good[:, 0], **kw)
    with pytest.raises(ValueError, match="--normalize"):
        train_protector(good * 2, **kw)
    nan = good.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_protector(nan, **kw)
    with pytest.raises(ValueError, match="does not accept images"):
        train_protector(good, protector=ProtectorNet(in_channels=3, resolution=8), **kw)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(1), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    with pytest.raises(ValueError, match="BatchNorm"):
        train_protector(good, protector=bn, **kw)
    with pytest.raises(ValueError, match="holdout"):
        train_protector(good, holdout=load_digits(2, size=16), **kw)
    with pytest.raises(ValueError, match="t_range"):
        train_protector(good, t_range=(0, 2000), **kw)
    with pytest.raises(ValueError, match="steps"):
        train_protector(good, schedule=s, steps=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a writable directory"):
        train_protector(good, checkpoint_dir=blocker / "ckpt", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_sigkill_mid_run_then_resume_matches(tmp_path):
    """A real SIGKILL (no Python clean-up at all) between checkpoints, then a resume."""
    import os
    import subprocess
    import sys

    ckpt = tmp_path / "ckpt"
    script = f"""
import os, signal, torch
torch.set_num_threads(1)
from cpsample_fast.data import load_digits
from cpsample_fast.protector import train_protector
from cpsample_fast.schedule import NoiseSchedule
def die(step, metrics):
    if step == 8:
        os.kill(os.getpid(), signal.SIGKILL)
train_protector(load_digits(9, size=8), schedule=NoiseSchedule(), protector={{"base_channels": 8}},
    steps=20, batch_size=7, lr=3e-3, progress=False, report_bins=2, seed=5,
    checkpoint_dir={str(ckpt)!r}, checkpoint_every=3, callback=die)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 6
    resumed, _ = _small(seed=5, checkpoint_dir=ckpt, checkpoint_every=3)
    ref, _ = _small(seed=5)
    err = max(
        (a - b).abs().max().item()
        for a, b in zip(resumed.state_dict().values(), ref.state_dict().values())
    )
    print("SIGKILL + resume vs uninterrupted max abs weight difference", err)
    assert err <= 1e-6


def test_config_object_and_keywords_are_the_same_call():
    """train_protector(config=...) equals the keyword call; keywords override the config's
    fields; an unknown keyword and a bad field are refused naming them, before any training."""
    from cpsample_fast.protector import ProtectorTrainConfig

    x = load_digits(6, size=8)
    kw = dict(steps=3, batch_size=3, seed=4, report_bins=2, progress=False)
    a, ra = train_protector(x, schedule=NoiseSchedule(), protector={"base_channels": 8}, **kw)
    cfg = ProtectorTrainConfig(**dict(kw, seed=9))
    b, rb = train_protector(
        x, schedule=NoiseSchedule(), protector={"base_channels": 8}, config=cfg, seed=4
    )
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ra.training["settings"] == rb.training["settings"]
    c, _ = train_protector(x, schedule=NoiseSchedule(), protector={"base_channels": 8}, config=cfg)
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(TypeError, match="unexpected keyword argument.*'stepz'"):
        train_protector(x, schedule=NoiseSchedule(), steps=3, stepz=4)
    with pytest.raises(TypeError, match="config must be a ProtectorTrainConfig"):
        train_protector(x, schedule=NoiseSchedule(), config={"steps": 3})
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ProtectorTrainConfig(steps=3, batch_size=0)
    with pytest.raises(ValueError, match="t_weights must be 1000 finite"):
        train_protector(x, schedule=NoiseSchedule(), steps=3, t_weights=torch.ones(5))
