"""Sample quality: Fréchet distance and KID between generated and held-out real images
(docs/ALGORITHM.md §6).

Feature spaces, always named in the result:

- ``"inception"``: standard Inception-v3 pool features (FID), only from a **local** weights file
  in torch-fidelity's format (``weights-inception-2015-12-05-6726825d.pth``), run through the
  ``torch-fidelity`` package, which builds the Inception graph itself (torchvision is not needed
  and is not installable here). Nothing is ever downloaded. pytorch-fid's checkpoint format is not
  supported: its loader needs torchvision.
- otherwise a small :class:`FeatureNet` that the package trains on the reference images (a
  denoising autoencoder's bottleneck, seeded): fine for comparing samplers against each other in
  one run, not comparable to published FIDs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .inputs import image_pair
from .replication import as_image_batch, extract_features

INCEPTION_HELP = (
    "Inception FID needs local weights: download torch-fidelity's "
    "'weights-inception-2015-12-05-6726825d.pth' (from the torch-fidelity GitHub releases) on a "
    "machine with network access, copy it here, `pip install torch-fidelity`, and pass its path "
    "(inception_weights=... / --inception-weights PATH). Without it, use features='trained' (a "
    "feature network trained on the reference images)."
)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets ``[N, D]``, ``[M, D]``.

    ``‖μ_a - μ_b‖² + tr(Σ_a + Σ_b - 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})`` in float64, with the
    matrix square roots from symmetric eigendecompositions (stable for singular covariances).
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"features must be [N, D] and [M, D], got {tuple(feats_a.shape)}, "
            f"{tuple(feats_b.shape)}"
        )
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 images per set")
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(ca)
    sa = (v * w.clamp_min(0).sqrt()) @ v.T
    m = sa @ cb @ sa
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt
    return float(fd.clamp_min(0))


def kernel_inception_distance(
    feats_a: torch.Tensor,  # [N, D]
    feats_b: torch.Tensor,  # [M, D]
    *,
    n_subsets: int = 50,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD² with the kernel ``(x·y/D + 1)³``, averaged over random subsets.

    Returns:
        ``(mean, std)`` over the subsets.
    """
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("KID needs at least 2 images per set")
    a, b = feats_a.double(), feats_b.double()
    d = a.shape[1]
    n = min(subset_size, a.shape[0], b.shape[0])
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n_subsets):
        x = a[torch.randperm(a.shape[0], generator=g)[:n]]
        y = b[torch.randperm(b.shape[0], generator=g)[:n]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = n * (n - 1)
        mmd = (kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
        vals.append(float(mmd - 2 * kxy.mean()))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0


class FeatureNet(nn.Module):
    """Small conv encoder ``[B, C, H, W] -> [B, dim]`` (trained by :func:`train_feature_net`)."""

    def __init__(self, in_channels: int, image_size: int, dim: int = 64, width: int = 32):
        super().__init__()
        self.in_channels, self.image_size, self.dim, self.width = (
            in_channels,
            image_size,
            dim,
            width,
        )
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(dim, 2 * width * 16),
            nn.SiLU(),
            nn.Unflatten(1, (2 * width, 4, 4)),
            nn.Upsample(size=(image_size, image_size), mode="bilinear", align_corners=False),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, in_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[B, dim]`` of ``x`` ``[B, C, H, W]``."""
        return self.encoder(x)


def train_feature_net(
    reference,  # [N, C, H, W]
    *,
    dim: int = 64,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    noise_std: float = 0.2,
    seed: int = 0,
) -> FeatureNet:
    """Train a :class:`FeatureNet` as a denoising autoencoder on the reference images.

    Deterministic for a given seed and data (so DDIM and CPSample are judged in one space).
    400 steps on 512 16×16 digits take ~6 s on one CPU thread (measured here).
    """
    ref = as_image_batch(reference, "reference")
    if ref.shape[2] != ref.shape[3]:
        raise ValueError(f"reference images must be square, got {tuple(ref.shape[2:])}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = FeatureNet(ref.shape[1], ref.shape[2], dim=dim)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        x = ref[torch.randint(0, ref.shape[0], (batch_size,), generator=g)]
        noisy = x + noise_std * torch.randn(x.shape, generator=g)
        loss = F.mse_loss(net.decoder(net.encoder(noisy)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    net.description = (
        f"FeatureNet (dim {dim}) trained here as a denoising autoencoder on {ref.shape[0]} "
        f"reference images ({steps} steps, seed {seed}); not comparable to Inception FID"
    )
    return net


def inception_extractor(weights_path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inception-v3 2048-d pool features from a local torch-fidelity weights file.

    Images are expected in [-1, 1]; they are quantised to uint8 and grey images repeated to
    three channels, as FID implementations do. Raises with instructions when the weights or
    ``torch-fidelity`` are missing (nothing is downloaded).
    """
    if weights_path is None:
        raise ValueError(
            "inception FID was asked for but no weights file was given. " + INCEPTION_HELP
        )
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found. " + INCEPTION_HELP)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ImportError("torch-fidelity is not installed. " + INCEPTION_HELP) from None
    fe = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    fe.eval()

    def extract(x: torch.Tensor) -> torch.Tensor:
        x8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x8.shape[1] == 1:
            x8 = x8.repeat(1, 3, 1, 1)
        return fe(x8)[0].float()

    extract.description = f"Inception-v3 pool3 (torch-fidelity weights {path.name})"
    return extract


@dataclass
class QualityResult:
    """Fréchet distance and KID in a named feature space."""

    frechet_distance: float
    kid_mean: float
    kid_std: float
    feature_space: str
    n_generated: int
    n_reference: int

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return dict(self.__dict__)


def quality(
    generated,  # [N, C, H, W]
    reference,  # [M, C, H, W]
    *,
    features: str | nn.Module | Callable = "auto",
    inception_weights=None,
    kid_subsets: int = 50,
    seed: int = 0,
) -> QualityResult:
    """Fréchet distance and KID between generated and held-out real images.

    Args:
        generated: ``[N, C, H, W]`` images in [-1, 1].
        reference: held-out real images, same image shape.
        features: ``"inception"`` (needs ``inception_weights``), ``"trained"`` (train a
            :class:`FeatureNet` on ``reference``), ``"auto"`` (inception when weights are given,
            else trained), ``"pixels"``, or an extractor ``[B, C, H, W] -> [B, D]`` (e.g. a
            FeatureNet trained once and shared between the samplers being compared).
        inception_weights: local torch-fidelity Inception weights file.
        kid_subsets: KID subsets.
        seed: seed of the trained feature net and the KID subsets.
    """
    gen, ref = image_pair(generated, reference, "generated", "reference")
    if features == "auto":
        features = "inception" if inception_weights is not None else "trained"
    if features == "inception":
        features = inception_extractor(inception_weights)
    elif features == "trained":
        features = train_feature_net(ref, seed=seed)
    elif isinstance(features, str) and features != "pixels":
        raise ValueError(
            f"features must be 'auto', 'inception', 'trained', 'pixels' or an "
            f"extractor, got {features!r}"
        )
    name = getattr(features, "description", None) or (
        features if isinstance(features, str) else type(features).__name__
    )
    fg = extract_features(gen, features, name="generated")
    fr = extract_features(ref, features, name="reference")
    fd = frechet_distance(fg, fr)
    km, ks = kernel_inception_distance(fg, fr, n_subsets=kid_subsets, seed=seed)
    if not math.isfinite(fd):
        raise ValueError("Fréchet distance is not finite (degenerate features?)")
    return QualityResult(fd, km, ks, name, gen.shape[0], ref.shape[0])
