"""ProtectorNet: shapes, per-sample independence, torch.func and torch.compile (docs/ALGORITHM.md
§2)."""

import pytest
import torch

from cpsample_fast.protector import ProtectorNet
from cpsample_fast.protector.model import default_channel_mult


def _net(**kw):
    torch.manual_seed(0)
    cfg = {"in_channels": 2, "resolution": 8, "base_channels": 8}
    cfg.update(kw)
    return ProtectorNet(**cfg).eval()


@pytest.mark.parametrize(
    ("channels", "resolution", "attn"), [(1, 8, ()), (3, 16, (8,)), (4, 32, (4,)), (3, 64, ())]
)
def test_shapes_for_default_sizes(channels, resolution, attn):
    net = ProtectorNet(channels, resolution, base_channels=8, attention_resolutions=attn)
    x = torch.randn(3, channels, resolution, resolution)  # odd batch
    out = net(x, torch.tensor([0, 500, 999]))
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    # Scalar t broadcasts over the batch.
    assert net(x, torch.tensor(5)).shape == (3,)


def test_default_depth_reaches_about_4x4():
    assert default_channel_mult(8) == (1, 2)
    assert default_channel_mult(16) == (1, 2, 2)
    assert default_channel_mult(64) == (1, 2, 2, 2, 4)


def test_config_round_trip_rebuilds_same_function():
    net = _net(attention_resolutions=(4,), channel_mult=(1, 2))
    twin = ProtectorNet.from_config(net.config)
    twin.load_state_dict(net.state_dict())
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([1, 2, 3])
    err = (net(x, t) - twin.eval()(x, t)).abs().max().item()
    print("config round trip max abs error", err)
    assert err == 0.0
    with pytest.raises(ValueError, match="unknown ProtectorNet config"):
        ProtectorNet.from_config({"width": 3})
    with pytest.raises(ValueError, match="in_channels"):
        ProtectorNet(in_channels=0)


def test_wrong_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        _net()(torch.randn(3, 3, 8, 8), torch.zeros(3, dtype=torch.long))


def test_jacobian_is_block_diagonal_over_the_batch():
    # Per-sample independence is what lets one VJP give every sample's guidance gradient.
    net = _net(attention_resolutions=(4,))
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([10, 400, 990])
    net = net.double()
    jac = torch.func.jacrev(lambda z: net(z, t))(x)  # [3, 3, 2, 8, 8]
    off = jac.clone()
    for b in range(3):
        off[b, b] = 0
    print("off-diagonal Jacobian max abs", off.abs().max().item())
    assert off.abs().max().item() == 0.0
    assert all(jac[b, b].abs().max() > 0 for b in range(3))
    # In train mode too (GroupNorm, never batch statistics).
    net.train()
    jac_train = torch.func.jacrev(lambda z: net(z, t))(x).clone()
    for b in range(3):
        jac_train[b, b] = 0
    assert jac_train.abs().max().item() == 0.0


def test_vjp_with_seed_equals_per_sample_gradients():
    net = _net()
    x = torch.randn(5, 2, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 999])
    c = torch.tensor([0.0, 1.5, -2.0, 0.25, 3.0])
    _, vjp = torch.func.vjp(lambda z: net(z, t), x)
    (g,) = vjp(c)
    ref = torch.zeros_like(x)
    for b in range(5):
        xb = x[b : b + 1].clone().requires_grad_(True)
        (gb,) = torch.autograd.grad(net(xb, t[b : b + 1]).sum(), xb)
        ref[b] = c[b] * gb[0]
    err = (g - ref).abs().max().item()
    print("vjp vs per-sample grad max abs error", err)
    assert err < 1e-5


def test_compiles_with_fullgraph():
    net = _net(attention_resolutions=(4,))
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([3, 30, 300])
    eager = net(x, t)

    def guided(z, tt, seed):
        out, vjp = torch.func.vjp(lambda q: net(q, tt), z)
        return out, vjp(seed)[0]

    # aot_eager traces forward and backward without generating C++ (which would take minutes on
    # a shared 2-core box); fullgraph=True fails on any graph break.
    compiled = torch.compile(guided, fullgraph=True, backend="aot_eager")
    out, grad = compiled(x, t, torch.ones(3))
    ref_out, ref_grad = guided(x, t, torch.ones(3))
    err = max((out - eager).abs().max().item(), (grad - ref_grad).abs().max().item())
    print("compiled vs eager max abs error", err)
    assert err < 1e-5
    assert (ref_out - eager).abs().max().item() == 0.0
