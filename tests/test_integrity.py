"""Nothing silently wrong (issue 12): shards verify themselves, resume regenerates bad ones,
foreign ones are refused, the output folder is locked, and bad input fails early in one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from cpsample_fast import shards as S
from cpsample_fast.cli.__main__ import main as cli_main


@pytest.fixture(scope="module")
def assets(tmp_path_factory, write_tiny_assets):
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    return write_tiny_assets(tmp_path_factory.mktemp("assets"), images, steps=2, batch_size=4)


def _args(assets, out, *extra, seed="4"):
    return [
        "sample", "--model", str(assets / "unet.safetensors"), "--protector",
        str(assets / "protector"), "--num-samples", "5", "--batch-size", "2", "--steps", "3",
        "--eta", "1.0", "--alpha", "0.5", "--scale", "10", "--seed", seed, "--no-progress",
        "--out", str(out), *extra,
    ]  # fmt: skip


def _run(assets, out, *extra, seed="4"):
    assert cli_main(_args(assets, out, *extra, seed=seed)) == 0


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted run with seed 4 and one with seed 5 (the ground truth)."""
    runs = {}
    for seed in ("4", "5"):
        out = tmp_path_factory.mktemp(f"ref{seed}")
        _run(assets, out, seed=seed)
        runs[seed] = out
    return runs


def _samples(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as data:
        return data["samples"]


def _shard_run_ids(out: Path) -> set[str]:
    from cpsample_fast.io import safetensors_metadata

    return {safetensors_metadata(p)["run_id"] for p in sorted((out / "shards").glob("batch_*"))}


class _KillAfter:
    """Stand-in for ``shards.write_shard`` that dies (like a kill) after ``n`` shards."""

    def __init__(self, n: int):
        self.n = n
        self.real = S.write_shard

    def __call__(self, *a, **k):
        if self.n == 0:
            raise KeyboardInterrupt("simulated kill")
        self.n -= 1
        return self.real(*a, **k)


# --------------------------------------------------------------------------- defect 1


def test_no_resume_then_killed_then_resume_never_mixes_runs(assets, reference, tmp_path):
    out = tmp_path / "run"
    _run(assets, out, seed="4")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "write_shard", _KillAfter(1))
        with pytest.raises(KeyboardInterrupt):
            cli_main(_args(assets, out, "--no-resume", seed="5"))
    assert not (out / "sample.json").exists()  # nothing looks finished after the kill
    assert not (out / "samples.npz").exists()
    _run(assets, out, seed="5")
    np.testing.assert_array_equal(_samples(out), _samples(reference["5"]))
    info = json.loads((out / "sample.json").read_text())
    assert info["seed"] == 5
    assert _shard_run_ids(out) == {info["run_id"]}


# --------------------------------------------------------------------------- defect 4


def test_truncated_and_bitflipped_shards_are_regenerated(assets, reference, tmp_path, capsys):
    out = tmp_path / "run"
    _run(assets, out)
    good = _samples(out)
    np.testing.assert_array_equal(good, _samples(reference["4"]))
    s0, s1 = S.shard_path(out, 0), S.shard_path(out, 1)
    s0.write_bytes(s0.read_bytes()[:-50])  # truncated
    raw = bytearray(s1.read_bytes())
    raw[-7] ^= 0x40  # one bit of the last tensor's data
    s1.write_bytes(bytes(raw))
    manifest = S.read_manifest(out)
    with pytest.raises(S.ShardError, match="unreadable"):
        list(S.iter_shards(out, manifest))
    capsys.readouterr()
    _run(assets, out)
    err = capsys.readouterr().err
    assert "batch_000000" in err and "unreadable" in err and "regenerating" in err
    assert "batch_000001" in err and "corrupt" in err
    np.testing.assert_array_equal(_samples(out), good)


def test_bitflipped_shard_is_never_merged(assets, tmp_path):
    out = tmp_path / "run"
    _run(assets, out)
    manifest = S.read_manifest(out)
    path = S.shard_path(out, 2)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(S.ShardError, match="corrupt"):
        from cpsample_fast.distributed import merge_run

        merge_run(out, manifest)


def test_foreign_shard_is_refused_and_regenerated(assets, reference, tmp_path, capsys):
    out = tmp_path / "run"
    _run(assets, out)
    foreign = S.shard_path(reference["5"], 1)
    S.shard_path(out, 1).write_bytes(foreign.read_bytes())  # same batch, another run (seed 5)
    manifest = S.read_manifest(out)
    with pytest.raises(S.ShardError, match="belongs to another run"):
        S.read_shard(
            S.shard_path(out, 1), run=manifest["run_id"], batch_index=1, first_sample=2, size=2
        )
    with pytest.raises(S.ShardError, match="belongs to another run"):
        list(S.iter_shards(out, manifest))
    capsys.readouterr()
    _run(assets, out)
    assert "belongs to another run" in capsys.readouterr().err
    np.testing.assert_array_equal(_samples(out), _samples(reference["4"]))
    assert len(_shard_run_ids(out)) == 1


def test_manifest_lists_every_shard_with_its_checksum(assets, reference):
    out = reference["4"]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_batches"] == 3
    assert sorted(manifest["shards"]) == ["000000", "000001", "000002"]
    for b, entry in manifest["shards"].items():
        tensors, checksum = S.read_shard(
            out / "shards" / entry["file"],
            run=manifest["run_id"],
            batch_index=int(b),
            first_sample=entry["first_sample"],
            size=entry["size"],
        )
        assert checksum == entry["sha256"] == S.content_sha256(tensors)


# --------------------------------------------------------------------------- defect 3


def test_a_locked_output_folder_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with S.OutputLock(out):
        assert cli_main(_args(assets, out)) == 2
        err = capsys.readouterr().err
        assert "in use by another cpsample run" in err and str(os.getpid()) in err
        assert not (out / "shards").exists()
    _run(assets, out)  # the lock is gone with its holder


# --------------------------------------------------------------------------- defect 6


def test_rejected_run_does_not_claim_the_folder(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_args(assets, out, "--steps", "5000")) == 2  # > the schedule's 1000 steps
    assert "num_inference_steps" in capsys.readouterr().err
    assert not (out / "shards" / "manifest.json").exists()
    _run(assets, out)


def test_protector_path_spellings_are_one_run(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _run(assets, out)
    monkeypatch.chdir(assets)
    for spelling in (
        "protector",
        "protector/",
        str(assets / "protector" / "protector.safetensors"),
    ):
        args = _args(assets, out)
        args[args.index("--protector") + 1] = spelling
        capsys.readouterr()
        assert cli_main(args) == 0, spelling
        assert "3 of 3 batches already done" in capsys.readouterr().out


# --------------------------------------------------------------------------- defect 5


def test_corrupt_eps_model_checkpoint_is_refused(assets, tmp_path, capsys):
    import shutil

    from cpsample_fast.models import load_unet

    bad = tmp_path / "unet.safetensors"
    shutil.copy(assets / "unet.safetensors", bad)
    shutil.copy(assets / "unet.json", tmp_path / "unet.json")
    load_unet(bad)  # the copy is fine
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        load_unet(bad)
    args = _args(assets, tmp_path / "out")
    args[args.index("--model") + 1] = str(bad)
    assert cli_main(args) == 2
    assert "corrupt" in capsys.readouterr().err


# --------------------------------------------------------------------------- defect 8


def test_every_output_file_has_one_mode(assets, reference):
    want = 0o666 & ~_umask()
    files = [p for p in reference["4"].rglob("*") if p.is_file() and p.name != S.LOCK_NAME]
    assert {p.suffix for p in files} >= {".safetensors", ".json", ".png", ".npz"}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {want}, modes
    assert not [p for p in reference["4"].rglob(".tmp-*")]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- nothing half-done


def test_failed_merge_leaves_nothing_that_looks_finished(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(assets, out)
    import cpsample_fast.eval.plots as plots

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "save_lines_png", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        cli_main(_args(assets, out))
    assert not (out / "sample.json").exists()
    assert not list(out.glob(".tmp-*"))


# --------------------------------------------------------------------------- outputs that scale


def test_streaming_npz_writer_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 2, 3)).astype(np.float32), rng.integers(0, 9, (7, 4))
    w = S.StreamingNpzWriter(tmp_path / "x.npz", 7)
    for s in (slice(0, 3), slice(3, 5), slice(5, 7)):
        w.append({"a": a[s], "b": b[s]})
    w.close()
    with np.load(tmp_path / "x.npz") as data:
        np.testing.assert_array_equal(data["a"], a)
        np.testing.assert_array_equal(data["b"], b)
    assert not list(tmp_path.glob(".tmp-*"))
    short = S.StreamingNpzWriter(tmp_path / "y.npz", 7)
    short.append({"a": a[:3]})
    with pytest.raises(ValueError, match="wrote 3 rows, expected 7"):
        short.close()
    assert not (tmp_path / "y.npz").exists() and not list(tmp_path.glob(".tmp-*"))


def test_shards_and_images_outputs_hold_the_same_samples(assets, reference, tmp_path):
    want = _samples(reference["4"])
    _run(assets, tmp_path / "shards", "--output", "shards")
    assert not (tmp_path / "shards" / "samples.npz").exists()
    got = np.concatenate([t["samples"].numpy() for _, t, _ in S.iter_shards(tmp_path / "shards")])
    np.testing.assert_array_equal(got, want)
    _run(assets, tmp_path / "img", "--output", "images")
    from PIL import Image

    for i in range(want.shape[0]):
        png = np.asarray(Image.open(S.image_path(tmp_path / "img" / "images", i)))
        u8 = np.clip(np.rint((want[i, 0] + 1) * 127.5), 0, 255)
        np.testing.assert_array_equal(png, u8)


def test_audit_record_is_kept_per_sample(assets, reference):
    with np.load(reference["4"] / "samples.npz") as data:
        gate, conf, final = data["gate"], data["confidence"], data["final_confidence"]
        index = data["sample_index"]
    assert gate.shape == conf.shape == (5, 3) and final.shape == (5,)
    np.testing.assert_array_equal(index, np.arange(5))
    for i in range(5):
        ran = np.flatnonzero(~np.isnan(conf[i]))
        assert final[i] == conf[i, ran[-1]]
    assert gate.max() == 1  # alpha = 0.5: the gate is open wherever the protector ran


# --------------------------------------------------------------------------- defect 7 (sample)


@pytest.mark.parametrize(
    ("flag", "value", "expect"),
    [
        ("--scale", "inf", "argument --scale: must be a finite number >= 0, got inf"),
        ("--seed", str(2**64), "argument --seed: must be an integer in [0, 2**64)"),
        ("--seed", "-1", "argument --seed"),
        ("--batch-size", "0", "argument --batch-size: must be an integer >= 1, got 0"),
        ("--alpha", "nan", "argument --alpha"),
    ],
)
def test_bad_sample_arguments_are_one_line(assets, tmp_path, capsys, flag, value, expect):
    args = _args(assets, tmp_path / "o")
    args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_largest_seed_is_accepted(assets, tmp_path):
    _run(assets, tmp_path / "o", "--num-samples", "2", seed=str(2**64 - 1))


def test_protector_channel_mismatch_and_resolution_warning(tmp_path, capsys, write_tiny_assets):
    rgb = write_tiny_assets(tmp_path / "rgb", torch.rand(4, 3, 16, 16) * 2 - 1, steps=1,
                            batch_size=2)  # fmt: skip
    small = write_tiny_assets(tmp_path / "small", torch.rand(4, 1, 8, 8) * 2 - 1, steps=1,
                              batch_size=2)  # fmt: skip
    for prot, code in ((rgb, 2), (small, 0)):
        args = _args(rgb, tmp_path / f"out-{prot.name}", "--num-samples", "1")
        args[args.index("--protector") + 1] = str(prot / "protector")
        assert cli_main(args) == code
    err = capsys.readouterr().err
    assert "--protector has in_channels=3, but the samples have 1 channels" in err
    assert "--protector has resolution=8 (trained on 8×8 images), but the samples are 16×16" in err


def test_nan_in_explicit_noise_is_named(assets):
    from cpsample_fast.models import load_unet
    from cpsample_fast.sampler import CPSampler
    from cpsample_fast.schedule import NoiseSchedule

    unet, _ = load_unet(assets / "unet.safetensors")
    sampler = CPSampler(unet, None, NoiseSchedule(), num_inference_steps=2)
    noise = torch.zeros(1, 1, 16, 16)
    noise[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="^noise contains NaN"):
        sampler.sample((1, 1, 16, 16), noise=noise)


# --------------------------------------------------------------------------- protector training


def _train(ckpt, steps, **extra):
    from cpsample_fast.protector import train_protector
    from cpsample_fast.schedule import NoiseSchedule

    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    kw = dict(schedule=NoiseSchedule(), protector={"base_channels": 8}, batch_size=2,
              progress=False, checkpoint_dir=ckpt, report_bins=2, report_max_images=2)  # fmt: skip
    kw.update(extra)
    return train_protector(images, steps=steps, **kw)


def test_tampered_train_state_pointer_cannot_touch_files_outside(tmp_path):
    ckpt = tmp_path / "run" / "train_state"
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    _train(ckpt, 2)
    pointer = ckpt / "train_state.json"
    state = json.loads(pointer.read_text())
    state["weights"] = "../../outside/victim.txt"
    pointer.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="pointer was modified"):
        _train(ckpt, 4)  # resume reads the pointer: refused
    _train(ckpt, 2, resume=False)  # a new state replaces the pointer: nothing outside is deleted
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "train_state-000000002.safetensors",
        "train_state.json",
    ]


def test_fewer_steps_than_a_finished_state_is_refused(tmp_path):
    _train(tmp_path / "ck", 4)
    with pytest.raises(ValueError, match="at step 4, past steps=2"):
        _train(tmp_path / "ck", 2)
    net, report = _train(tmp_path / "ck", 4)  # the same steps: the finished run, as it was
    assert report.training["steps_run"] == 4


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"report_bins": 0}, "report_bins must be an int >= 1"),
        ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
        ({"holdout_weight": float("nan")}, "holdout_weight must be a finite number >= 0"),
        ({"holdout_weight": -1.0}, "holdout_weight must be a finite number >= 0, got -1"),
        ({"seed": 2**64}, r"seed must be in \[0, 2\*\*64\)"),
        ({"label_seed": -1}, r"label_seed must be in \[0, 2\*\*64\)"),
    ],
)
def test_protector_training_arguments_fail_before_training(tmp_path, extra, match):
    steps_run = []
    with pytest.raises(ValueError, match=match):
        _train(tmp_path / "ck", 2, callback=lambda step, m: steps_run.append(step), **extra)
    assert steps_run == [] and not (tmp_path / "ck").exists()


def test_protector_training_accepts_the_largest_seed(tmp_path):
    _train(None, 1, seed=2**64 - 1, label_seed=2**64 - 1)


# --------------------------------------------------------------------------- every subcommand


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["train-protector", "--data", "digits", "--report-bins", "0", "--out", "o"],
         "argument --report-bins: must be an integer >= 1, got 0"),
        (["train-protector", "--data", "digits", "--lr", "inf", "--out", "o"],
         "argument --lr: must be a finite number > 0, got inf"),
        (["train-protector", "--data", "digits", "--holdout-weight", "-1", "--out", "o"],
         "argument --holdout-weight"),
        (["train-protector", "--data", "digits", "--seed", str(2**64), "--out", "o"],
         "argument --seed: must be an integer in [0, 2**64)"),
        (["train-protector", "--data", "folder", "--out", "o"], "--data folder needs --path"),
        (["evaluate", "--samples", "nope.npz", "--train", "digits-members", "--out", "o"],
         "nope.npz"),
        (["evaluate", "--samples", "x", "--train", "y", "--scale", "3", "--out", "o"],
         "--scale"),
        (["sample", "--model", "nope", "--out", "o"], "--model"),
        (["bench", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)  # fmt: skip
def test_every_subcommand_turns_bad_input_into_one_line(tmp_path, monkeypatch, capsys, argv,
                                                        expect):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert expect in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err


# --------------------------------------------------------------------------- sharded evaluation


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_replication_over_a_sharded_output_streams_and_matches(reference, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    from cpsample_fast import eval as cps_eval

    train = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    whole = cps_eval.replication(_samples(reference["4"]), train, carlini_n=3, backend="torch")
    seen = []
    real_iter = S.iter_shards

    def counting(*a, **k):
        for item in real_iter(*a, **k):
            seen.append(item[1]["samples"].shape[0])
            yield item

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "iter_shards", counting)
        streamed = cps_eval.replication(reference["4"], train, carlini_n=3, backend=backend)
    assert seen == [2, 2, 1]  # shard by shard
    assert streamed.backend == backend
    torch.testing.assert_close(streamed.similarity, whole.similarity, atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed.l2_ratio, whole.l2_ratio, atol=1e-4, rtol=1e-4)
    assert torch.equal(streamed.nearest_index, whole.nearest_index)


def test_evaluate_carries_the_audit_record(reference, tmp_path):
    train = (torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1).numpy()
    np.savez(tmp_path / "train.npz", images=train)
    reports = {}
    for name, spec in (("folder", reference["4"]), ("npz", reference["4"] / "samples.npz")):
        out = tmp_path / name
        argv = ["evaluate", "--samples", str(spec), "--train", str(tmp_path / "train.npz"),
                "--out", str(out)]  # fmt: skip
        assert cli_main(argv) == 0
        reports[name] = json.loads((out / "evaluation.json").read_text())
        with np.load(out / "per_sample.npz") as per:
            np.testing.assert_array_equal(per["sample_index"], np.arange(5))
            with np.load(reference["4"] / "samples.npz") as samples:
                np.testing.assert_array_equal(per["gate"], samples["gate"])
                np.testing.assert_array_equal(per["final_confidence"], samples["final_confidence"])
            top = reports[name]["audit"]["most_similar"][0]
            i = int(np.argmax(per["similarity"]))
            assert top["sample_index"] == i
            assert top["gate_open_steps"] == np.flatnonzero(per["gate"][i]).tolist()
    a, b = reports["folder"]["audit"], reports["npz"]["audit"]  # streamed vs in memory
    assert a["fraction_ever_guided"] == b["fraction_ever_guided"]
    assert a["final_confidence_mean"] == b["final_confidence_mean"]
    for x, y in zip(a["most_similar"], b["most_similar"], strict=True):
        assert x["similarity"] == pytest.approx(y["similarity"], abs=1e-6)
        assert {k: v for k, v in x.items() if k != "similarity"} == {
            k: v for k, v in y.items() if k != "similarity"
        }
    assert reports["folder"]["replication"]["similarity_mean"] == pytest.approx(
        reports["npz"]["replication"]["similarity_mean"], abs=1e-6
    )


def test_train_protector_folder_never_looks_finished_mid_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "prot"
    argv = ["train-protector", "--data", "digits", "--size", "8", "--steps", "2",
            "--batch-size", "4", "--width", "8", "--report-bins", "2", "--no-progress",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    assert (out / "result.json").is_file()
    argv[argv.index("--steps") + 1] = "1"  # refused: the state is at step 2
    assert cli_main(argv) == 2
    assert "past steps=1" in capsys.readouterr().err
    assert (out / "result.json").is_file()  # a refused run leaves the finished one alone
    import cpsample_fast.protector as prot

    def killed(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(prot, "save_protector", killed)
    argv[argv.index("--steps") + 1] = "3"
    with pytest.raises(KeyboardInterrupt):
        cli_main(argv)
    assert not (out / "result.json").exists() and not (out / "protector.safetensors").exists()
    with S.OutputLock(out):  # the lock died with the "killed" run; now another run holds it
        assert cli_main(argv) == 2
        assert "in use by another cpsample run" in capsys.readouterr().err


def test_lock_held_by_another_process_refuses_a_second_run(assets, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import sys, time\n"
        "from cpsample_fast.shards import OutputLock\n"
        "lock = OutputLock(sys.argv[1]); lock.acquire(); print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli_main(_args(assets, out)) == 2
        assert f"in use by another cpsample run (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    _run(assets, out)  # the holder is gone, and its lock with it
