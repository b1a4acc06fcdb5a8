"""The options reference_sample and CPSampler share are checked in one place, alike."""

from __future__ import annotations

import pytest
import torch

from cpsample_fast.reference import reference_sample
from cpsample_fast.sampler import CPSampler
from cpsample_fast.sampling_options import as_int64, check_offset, resolve_sampling_options
from cpsample_fast.schedule import NoiseSchedule

SCHED = NoiseSchedule.linear(100)


def _eps(x, t):
    return torch.zeros_like(x)


def _prot(x, t):
    return x.flatten(1).sum(1)


BAD = [
    ({"guidance_range": (50, 10)}, ValueError, "t_min <= t_max"),
    ({"use_clipped_model_output": 1}, TypeError, "use_clipped_model_output"),
    ({"solver": "dpmsolver++", "use_clipped_model_output": True}, ValueError, "DDIM option"),
    ({"scale": None}, TypeError, "scale"),
    ({"alpha": 0.7}, ValueError, "alpha"),
    ({"mode": "push"}, ValueError, "mode"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_reference_and_sampler_refuse_alike(kwargs, error, match):
    opts = {"num_inference_steps": 4, "scale": 10.0, "alpha": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        reference_sample(_eps, _prot, SCHED, (1, 1, 4, 4), **opts)
    with pytest.raises(error, match=match):
        CPSampler(_eps, _prot, SCHED, **opts)


def test_guides_at_honours_protector_scale_and_inclusive_range():
    def resolve(protector, scale, guidance_range):
        return resolve_sampling_options(
            protector, SCHED, num_inference_steps=4, eta=0.0, scale=scale, alpha=0.1,
            mode="repel", solver="ddim", use_clipped_model_output=False,
            guidance_range=guidance_range,
        )  # fmt: skip

    opts = resolve(_prot, 5.0, (10, 20))
    assert [opts.guides_at(t, True) for t in (9, 10, 20, 21)] == [False, True, True, False]
    assert not opts.guides_at(15, False)  # no protector
    assert not resolve(_prot, 0.0, None).guides_at(15, True)  # scale 0 is plain DDIM
    assert resolve(None, None, None).scale == 0.0


def test_sampler_and_reference_guide_the_same_steps():
    sampler = CPSampler(_eps, _prot, SCHED, num_inference_steps=4, scale=5.0, alpha=0.1,
                        guidance_range=(30, 60))  # fmt: skip
    expected = [30 <= int(t) <= 60 for t in SCHED.timesteps(4)]
    assert sampler._guided_steps == expected and any(expected) and not all(expected)


def test_seed_words_and_sample_offset():
    assert as_int64(2**64 - 1) == -1 and as_int64(2**63 - 1) == 2**63 - 1
    assert check_offset(2**32 - 1) == 2**32 - 1
    with pytest.raises(ValueError, match="sample_offset"):
        check_offset(2**32)
    with pytest.raises(ValueError, match="sample_offset"):
        check_offset(-1)
