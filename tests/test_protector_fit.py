"""One rule for whether a protector fits the samples it judges (``protector.fit``), used by the
CLI, the diffusers pipelines, ``ProtectedScheduler`` and the rejection baseline."""

from __future__ import annotations

import pytest
import torch

from cpsample_fast.protector import ProtectorNet
from cpsample_fast.protector.fit import check_protector_fits


def test_channels_resolution_and_probe():
    net = ProtectorNet(in_channels=1, resolution=8, base_channels=8, channel_mult=(1, 2))
    check_protector_fits(net, (1, 8, 8))  # fits: nothing raised or warned
    check_protector_fits(net, (1, None, None))  # size unknown: channels only
    with pytest.raises(ValueError, match="prot has in_channels=1, but the samples have 3"):
        check_protector_fits(net, (3, 8, 8), name="prot")
    with pytest.raises(
        ValueError, match=r"resolution=8 \(trained on 8×8 images\), but the samples are 16×16"
    ):
        check_protector_fits(net, (1, 16, 16))
    seen = []
    check_protector_fits(net, (1, 16, 16), resolution="warn", warn=seen.append)
    assert len(seen) == 1 and "may mean nothing" in seen[0]
    with pytest.warns(UserWarning, match="resolution=8"):
        check_protector_fits(net, (1, 16, 16), resolution="warn")
    with pytest.raises(ValueError, match="resolution must be 'error' or 'warn'"):
        check_protector_fits(net, (1, 8, 8), resolution="ignore")


def test_probe_catches_protectors_that_declare_nothing():
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))

    def prot(x, t):
        return flat(x)[:, 0]

    check_protector_fits(prot, (1, 8, 8), probe=True)
    check_protector_fits(prot, (3, 16, 16))  # declares nothing, not probed: accepted
    with pytest.raises(ValueError, match=r"does not match the model's image shape \(3, 16, 16\)"):
        check_protector_fits(prot, (3, 16, 16), probe=True)
