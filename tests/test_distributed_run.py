"""The sharded run as a library (``distributed.run_sharded``), without the CLI around it.

A stand-in ``sample_batch`` makes every sample a known function of its global index, so the
merged output, the resume (verified batches are not sampled again) and the regeneration of a
damaged shard can be checked exactly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cpsample_fast import distributed as D
from cpsample_fast import shards as S

STEPS = 3


def _trace(first: int, size: int) -> SimpleNamespace:
    """A sampling trace ``[steps, n]``: sample i is gated at step i % STEPS, with the
    protector run everywhere except at the last step of odd samples."""
    idx = torch.arange(first, first + size)
    gate = torch.stack([idx % STEPS == s for s in range(STEPS)])
    conf = torch.stack([idx.float() / 100 + s for s in range(STEPS)])
    conf[-1, idx % 2 == 1] = float("nan")
    return SimpleNamespace(gate=gate, confidence=conf)


class _Batches:
    """``sample_batch`` whose sample ``i`` is the constant image ``i / 10 - 1``."""

    def __init__(self):
        self.calls = []

    def __call__(self, first: int, size: int) -> dict[str, torch.Tensor]:
        self.calls.append((first, size))
        x = (torch.arange(first, first + size).float() / 10 - 1).view(-1, 1, 1, 1)
        return D.audit_record(x.expand(-1, 1, 4, 4), _trace(first, size), first)


def _run(out, sampler, *, n=5, batch=2, **kw):
    manifest = S.new_manifest({"test": "run", "n": n}, n, batch)
    return manifest, D.run_sharded(sampler, out, manifest, info=D.RankInfo(), seed=7,
                                   progress=False, **kw)  # fmt: skip


def test_audit_record_final_confidence_is_the_last_step_run():
    rec = D.audit_record(torch.zeros(4, 1, 2, 2), _trace(10, 4), 10)
    conf = _trace(10, 4).confidence.T
    assert rec["sample_index"].tolist() == [10, 11, 12, 13]
    assert rec["gate"].dtype == torch.uint8 and rec["gate"].shape == (4, STEPS)
    # even samples: the last step; odd ones: the step before (the last was NaN)
    want = torch.stack([conf[0, 2], conf[1, 1], conf[2, 2], conf[3, 1]])
    torch.testing.assert_close(rec["final_confidence"], want)
    never = SimpleNamespace(gate=torch.zeros(2, 1, dtype=torch.bool),
                            confidence=torch.full((2, 1), float("nan")))  # fmt: skip
    assert D.audit_record(torch.zeros(1, 1, 2, 2), never, 0)["final_confidence"].isnan().all()


def test_run_sharded_merges_resumes_and_regenerates(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "sample.json").write_text("{}")  # a finished run's marker goes when a run starts
    sampler = _Batches()
    manifest, stats = _run(out, sampler, result_files=("sample.json",))
    assert sampler.calls == [(0, 2), (2, 2), (4, 1)]
    assert not (out / "sample.json").exists()
    with np.load(out / "samples.npz") as data:
        np.testing.assert_allclose(data["samples"][:, 0, 0, 0], np.arange(5) / 10 - 1)
        assert data["sample_index"].tolist() == list(range(5))
    assert stats["files"] == ["samples.npz", "shards/manifest.json", "grid.png", "trace.png"]
    # every sample is gated exactly once, at step i % 3: 2, 2, 1 of 5 per step
    assert stats["mean_fraction_guided_per_step"] == pytest.approx([0.4, 0.4, 0.2])
    assert stats["fraction_of_samples_ever_guided"] == 1.0
    assert json.loads(S.manifest_path(out).read_text())["complete"] is True

    # resume: nothing is sampled again; a damaged shard is reported and regenerated
    path = S.shard_path(out, 1)
    path.write_bytes(path.read_bytes()[:-20])
    sampler.calls.clear()
    warned = []
    _run(out, sampler, warn=warned.append, announce=lambda done: warned.append(done))
    assert sampler.calls == [(2, 2)]
    assert warned[0].endswith("regenerating it") and "batch_000001" in warned[0]
    assert warned[1] == 2  # batches already done (verified)


def test_run_sharded_refuses_another_runs_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _run(out, _Batches())
    other = _Batches()
    with pytest.raises(ValueError, match="holds shards of a different run .*n"):
        _run(out, other, n=4)
    assert other.calls == []  # refused before anything is sampled
    _run(out, other, n=4, resume=False)  # --no-resume clears the old shards
    assert other.calls == [(0, 2), (2, 2)]
    with np.load(out / "samples.npz") as data:
        assert data["samples"].shape[0] == 4


def test_run_sharded_images_output(tmp_path):
    _, stats = _run(tmp_path, _Batches(), output="images")
    assert stats["files"] == ["images/", "shards/manifest.json", "grid.png", "trace.png"]
    assert not (tmp_path / "samples.npz").exists()
    assert len(list((tmp_path / "images").rglob("*.png"))) == 5
