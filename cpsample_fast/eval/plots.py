"""PNG figures for the evaluation reports (matplotlib, Agg backend, atomic writes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    """Write the figure as a PNG atomically (``cpsample_fast.io.atomic_path``) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        _plt().close(fig)


def _to_hwc(img: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    lo, hi = value_range
    x = ((img.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    x = x.permute(1, 2, 0).numpy()
    return x[..., 0] if x.shape[2] == 1 else x


def save_pairs_png(
    top: torch.Tensor,  # [n, C, H, W]
    bottom: torch.Tensor,  # [n, C, H, W]
    titles: Sequence[str],
    path,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    top_label: str = "",
    bottom_label: str = "",
) -> None:
    """Two rows of images (pairs in columns) with a title above each column."""
    plt = _plt()
    n = max(1, top.shape[0])
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n + 0.6, 2.6), squeeze=False)
    for j in range(n):
        for r, imgs in enumerate((top, bottom)):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < imgs.shape[0]:
                ax.imshow(_to_hwc(imgs[j], value_range), cmap="gray", vmin=0, vmax=1)
        if j < len(titles):
            axes[0, j].set_title(titles[j], fontsize=8)
    axes[0, 0].set_ylabel(top_label, fontsize=8)
    axes[1, 0].set_ylabel(bottom_label, fontsize=8)
    _save(fig, path)


def save_image_grids(
    grids: dict[str, torch.Tensor],  # name -> [N, C, H, W]
    path,
    *,
    ncol: int = 8,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> None:
    """Side-by-side image grids, one panel per entry of ``grids``."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 4.4), squeeze=False)
    for ax, (name, imgs) in zip(axes[0], grids.items()):
        n = imgs.shape[0]
        nrow = (n + ncol - 1) // ncol
        c, h, w = imgs.shape[1:]
        canvas = torch.full((c, nrow * (h + 1) + 1, ncol * (w + 1) + 1), value_range[1])
        for i in range(n):
            r, q = divmod(i, ncol)
            canvas[
                :, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w
            ] = imgs[i].detach().float().cpu()
        ax.imshow(_to_hwc(canvas, value_range), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path)


def save_roc_png(
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path, *, title: str = ""
) -> None:
    """ROC curves: ``name -> (fpr, tpr, auc)``, with the chance diagonal."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def save_lines_png(
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    invert_x: bool = False,
    hlines: Sequence[float] = (),
) -> None:
    """Line plot of ``name -> (x, y)`` series (e.g. confidence per step, accuracy per noise)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, (x, y) in series.items():
        ax.plot(np.asarray(x), np.asarray(y), label=name, lw=1.2)
    for h in hlines:
        ax.axhline(h, color="k", ls=":", lw=0.8)
    if invert_x:
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if series:
        ax.legend(fontsize=7)
    _save(fig, path)
