"""Where a protector can act: member accuracy and confidence per noise level (docs/ALGORITHM.md §2).

:func:`evaluate_protector` noises every image once per timestep bin with a fixed, seeded
generator and records, per bin, the accuracy against the labels, the mean confidence
``q = sigmoid(|f|)`` and the fraction of samples whose gate would open at α
(``min(r, 1-r) < α``). :class:`ProtectorReport` keeps those numbers with the labels and the
fingerprint and writes them as JSON and as a PNG plot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..guidance import gate as _gate
from ..io import atomic_path, write_json_atomic
from ..schedule import forward_noise

REPORT_GATE_ALPHA = 0.001  # the paper's α (Fig. 1); the gate fraction reported per bin


def noised(
    x0: torch.Tensor,  # [B, C, H, W]
    t: torch.Tensor,  # [B] int64
    noise: torch.Tensor,  # [B, C, H, W]
    alphas_cumprod: torch.Tensor,  # [T] float32
) -> torch.Tensor:
    """``√ᾱ_t x0 + √(1-ᾱ_t) ε`` (docs/ALGORITHM.md §2): :func:`cpsample_fast.schedule.forward_noise`
    in float32."""
    return forward_noise(x0.float(), noise.float(), t, alphas_cumprod.float())


def timestep_bins(t_lo: int, t_hi: int, bins: int) -> list[int]:
    """``bins + 1`` integer edges splitting ``[t_lo, t_hi)`` into nearly equal parts."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    bins = min(bins, t_hi - t_lo)
    return [t_lo + (t_hi - t_lo) * k // bins for k in range(bins + 1)]


@torch.no_grad()
def evaluate_protector(
    protector: nn.Module,
    images: torch.Tensor,  # [N, C, H, W] in [-1, 1]
    labels: torch.Tensor | None,  # [N] 0/1, None for non-members
    alphas_cumprod: torch.Tensor,  # [T]
    edges: list[int],
    *,
    seed: int = 0,
    batch_size: int = 256,
    alpha: float = REPORT_GATE_ALPHA,
) -> dict[str, list[float]]:
    """Accuracy, mean confidence and gate fraction per timestep bin.

    Every image is noised once per bin at a timestep drawn uniformly inside the bin; the noise
    comes from a CPU generator seeded with ``seed``, so the numbers reproduce exactly.

    Args:
        protector: ``nn.Module(x, t) -> [B]``.
        images: The images.
        labels: Their labels; ``None`` (non-members) scores against fresh Bernoulli(1/2) labels
            drawn from ``seed``, i.e. chance level for a protector that knows nothing of them.
        alphas_cumprod: The training schedule's ᾱ.
        edges: Bin edges from :func:`timestep_bins`.
        seed: Evaluation noise seed.
        batch_size: Images per forward pass.
        alpha: Gate threshold for ``gate_fraction``.

    Returns:
        ``{"accuracy", "confidence", "gate_fraction"}``, each a list with one float per bin.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = images.shape[0]
    if labels is None:
        labels = torch.randint(0, 2, (n,), generator=gen)
    device = next(iter(protector.parameters()), images).device
    was_training = protector.training
    protector.eval()
    acc, conf, gate = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = torch.randint(lo, hi, (n,), generator=gen)
        hits = q_sum = open_sum = 0.0
        for s in range(0, n, batch_size):
            x0 = images[s : s + batch_size].cpu()
            eps = torch.randn(x0.shape, generator=gen)  # per chunk: memory stays one batch
            x = noised(x0, t[s : s + batch_size], eps, alphas_cumprod.cpu())
            f = protector(x.to(device), t[s : s + batch_size].to(device)).float().cpu()
            y = labels[s : s + batch_size].cpu()
            hits += float(((f > 0).long() == y).sum())
            q_sum += float(torch.sigmoid(f.abs()).sum())
            open_sum += float(_gate(f, alpha).sum())
        acc.append(hits / n)
        conf.append(q_sum / n)
        gate.append(open_sum / n)
    protector.train(was_training)
    return {"accuracy": acc, "confidence": conf, "gate_fraction": gate}


@dataclass
class ProtectorReport:
    """What a protector learned, and where along the noise schedule it can act.

    Attributes:
        labels: int64 ``[N]`` member labels ``y_i``.
        fingerprint: The training set's fingerprint (``labels.dataset_fingerprint``).
        label_seed: Seed the labels were drawn from.
        t_edges: Timestep bin edges (``len = bins + 1``).
        member: Per-bin ``accuracy`` / ``confidence`` / ``gate_fraction`` on the members.
        holdout: The same for hold-out (non-member) images, or ``None``.
        training: Settings and outcome of training (steps, time, loss, schedule config, ...).
        gate_alpha: The α used for ``gate_fraction``.
    """

    labels: torch.Tensor
    fingerprint: dict[str, Any]
    label_seed: int
    t_edges: list[int]
    member: dict[str, list[float]]
    holdout: dict[str, list[float]] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    gate_alpha: float = REPORT_GATE_ALPHA

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary (labels as a list of ints)."""
        return {
            "labels": [int(v) for v in self.labels.tolist()],
            "fingerprint": dict(self.fingerprint),
            "label_seed": int(self.label_seed),
            "t_edges": [int(e) for e in self.t_edges],
            "member": self.member,
            "holdout": self.holdout,
            "training": self.training,
            "gate_alpha": float(self.gate_alpha),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProtectorReport:
        """Inverse of :meth:`to_dict`."""
        return cls(
            labels=torch.tensor(list(d["labels"]), dtype=torch.int64),
            fingerprint=dict(d["fingerprint"]),
            label_seed=int(d["label_seed"]),
            t_edges=[int(e) for e in d["t_edges"]],
            member={k: list(v) for k, v in d["member"].items()},
            holdout=None if d.get("holdout") is None else dict(d["holdout"]),
            training=dict(d.get("training", {})),
            gate_alpha=float(d.get("gate_alpha", REPORT_GATE_ALPHA)),
        )

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as JSON text; also written atomically to ``path`` when given."""
        d = self.to_dict()
        if path is not None:
            write_json_atomic(path, d)
        return json.dumps(d, indent=2, sort_keys=True)

    def acting_range(self, min_accuracy: float = 0.95) -> tuple[int, int] | None:
        """The widest run of bins from t = 0 up whose member accuracy is ≥ ``min_accuracy``.

        Returns:
            ``(t_lo, t_hi)`` (half-open) or ``None`` if even the least-noisy bin falls short.
        """
        k = 0
        while k < len(self.member["accuracy"]) and self.member["accuracy"][k] >= min_accuracy:
            k += 1
        return None if k == 0 else (self.t_edges[0], self.t_edges[k])

    def summary(self) -> str:
        """A few human-readable lines: per-bin accuracy / confidence and the acting range."""
        lines = [f"   t range      member acc   member q   gate@{self.gate_alpha:g}   hold-out q"]
        for k, (lo, hi) in enumerate(zip(self.t_edges[:-1], self.t_edges[1:])):
            hq = "" if self.holdout is None else f"{self.holdout['confidence'][k]:.3f}"
            lines.append(
                f"  [{lo:4d},{hi:4d})   {self.member['accuracy'][k]:8.3f}   "
                f"{self.member['confidence'][k]:8.3f}   {self.member['gate_fraction'][k]:7.3f}"
                f"   {hq}"
            )
        rng = self.acting_range()
        lines.append(
            "protector reaches 95% member accuracy for t in "
            + (f"[{rng[0]}, {rng[1]})" if rng else "no bin (train longer or wider)")
        )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG: accuracy and confidence against the timestep (matplotlib, Agg).

        Args:
            path: Destination ``.png`` (written atomically).

        Returns:
            The destination path.
        """
        # A bare Figure renders with Agg and leaves pyplot's global backend alone.
        from matplotlib.figure import Figure

        mids = [(lo + hi) / 2 for lo, hi in zip(self.t_edges[:-1], self.t_edges[1:])]
        fig = Figure(figsize=(6.4, 4.0), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(mids, self.member["accuracy"], "o-", label="member accuracy")
        ax.plot(mids, self.member["confidence"], "s--", label="member confidence q")
        ax.plot(
            mids,
            self.member["gate_fraction"],
            "^:",
            label=f"member gate open (α={self.gate_alpha:g})",
        )
        if self.holdout is not None:
            ax.plot(mids, self.holdout["accuracy"], "o-", alpha=0.6, label="hold-out accuracy")
            ax.plot(
                mids, self.holdout["confidence"], "s--", alpha=0.6, label="hold-out confidence q"
            )
        ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_xlabel("timestep t (training schedule)")
        ax.set_ylabel("fraction")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"protector on {self.fingerprint.get('count', '?')} members")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        dest = Path(path)
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format="png")
        return dest


def final_report(
    protector: nn.Module,
    members: torch.Tensor,  # [N, C, H, W]
    labels: torch.Tensor,  # [N] int64
    holdout: torch.Tensor | None,  # [M, C, H, W]
    alphas_cumprod: torch.Tensor,  # [T]
    *,
    fingerprint: dict[str, Any],
    label_seed: int,
    seed: int,
    training: dict[str, Any],
    bins: int,
    max_images: int,
) -> ProtectorReport:
    """The report after training: member (and hold-out) accuracy and confidence per noise bin.

    The first ``max_images`` members and hold-out images are scored once per bin; their noise
    comes from ``seed + 2`` and ``seed + 3`` (the early-stop check of training uses
    ``seed + 1``), so the report reproduces exactly.
    """
    T = int(alphas_cumprod.shape[0])
    edges = timestep_bins(0, T, bins)
    k = max_images
    member = evaluate_protector(
        protector, members[:k], labels[:k], alphas_cumprod, edges, seed=(seed + 2) % 2**64
    )
    hold = (
        None
        if holdout is None
        else evaluate_protector(
            protector, holdout[:k], None, alphas_cumprod, edges, seed=(seed + 3) % 2**64
        )
    )
    return ProtectorReport(
        labels=labels,
        fingerprint=fingerprint,
        label_seed=label_seed,
        t_edges=edges,
        member=member,
        holdout=hold,
        training=training,
    )
