"""The per-sample audit record of ``cpsample sample``, carried through ``cpsample evaluate``.

Every sample's shard row holds ``sample_index``, ``gate [steps]`` (1 at each loop step where
guidance acted), ``confidence [steps]`` (the protector's q, NaN where it was not run) and
``final_confidence`` (q at the last step where it ran). The merged ``samples.npz`` keeps those
keys; ``cpsample evaluate`` joins them with each sample's nearest-training-neighbour result into
``per_sample.npz`` and summarises them in ``evaluation.json`` (docs/CONTRACTS.md "Sharded
output").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

AUDIT_KEYS = ("sample_index", "gate", "final_confidence")


def is_sharded_run(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` is the output folder of a ``cpsample sample`` run (has a manifest)."""
    from .shards import manifest_path

    return Path(spec).is_dir() and manifest_path(spec).is_file()


def load_audit(spec: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The audit arrays of a samples ``.npz`` or a sharded run (``None`` when it has none).

    Reads a sharded run shard by shard (verified), keeping only the small audit arrays.
    """
    path = Path(spec)
    if is_sharded_run(path):
        from .shards import iter_shards, open_sharded_output

        parts: dict[str, list[np.ndarray]] = {k: [] for k in AUDIT_KEYS}
        for _, tensors, _ in iter_shards(path, open_sharded_output(path)):
            if not all(k in tensors for k in AUDIT_KEYS):
                return None
            for k in AUDIT_KEYS:
                parts[k].append(tensors[k].numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if all(k in data for k in AUDIT_KEYS):
                return {k: data[k] for k in AUDIT_KEYS}
    return None


def load_sharded_samples(spec: str | os.PathLike, indices=None) -> torch.Tensor:
    """Samples of a sharded run: all of them, or only ``indices`` (streamed, in that order)."""
    from .shards import iter_shards, open_sharded_output

    path = Path(spec)
    want = None if indices is None else np.asarray(indices, dtype=np.int64)
    found: dict[int, np.ndarray] = {}
    chunks = []
    for first, tensors, _ in iter_shards(path, open_sharded_output(path)):
        x = tensors["samples"].numpy()
        if want is None:
            chunks.append(x)
            continue
        rows = want[(want >= first) & (want < first + x.shape[0])]
        for i in rows.tolist():
            found[i] = x[i - first]
    if want is None:
        return torch.from_numpy(np.concatenate(chunks))
    return torch.from_numpy(np.stack([found[int(i)] for i in want]))


def audit_summary(rep, audit: dict[str, np.ndarray], top: int = 10) -> dict:
    """JSON summary joining the replication result with the audit record.

    Lists the ``top`` samples most similar to a training image with their final confidence
    and the steps at which their gate opened, and compares the similarity of samples that
    guidance acted on with those it never touched.
    """
    sim = rep.similarity.double().numpy()
    gate = audit["gate"].astype(bool)
    if gate.shape[0] != sim.shape[0]:
        raise ValueError(
            f"the audit record has {gate.shape[0]} samples, the samples {sim.shape[0]}"
        )
    ever = gate.any(1)
    final = audit["final_confidence"].astype(np.float64)
    order = np.argsort(-sim, kind="stable")[:top]

    def mean(x):
        return float(x.mean()) if x.size else None

    return {
        "file": "per_sample.npz",
        "n": int(sim.shape[0]),
        "fraction_ever_guided": float(ever.mean()),
        "similarity_mean_guided": mean(sim[ever]),
        "similarity_mean_never_guided": mean(sim[~ever]),
        "final_confidence_mean": mean(final[~np.isnan(final)]),
        "most_similar": [
            {
                "sample_index": int(audit["sample_index"][i]),
                "similarity": float(sim[i]),
                "nearest_train_index": int(rep.nearest_index[i]),
                "final_confidence": None if np.isnan(final[i]) else float(final[i]),
                "gate_open_steps": np.flatnonzero(gate[i]).tolist(),
            }
            for i in order
        ],
    }


def save_per_sample(path: str | os.PathLike, rep, audit: dict[str, np.ndarray]) -> Path:
    """``per_sample.npz``: each sample's index, nearest-neighbour result and audit record."""
    from .shards import StreamingNpzWriter

    n = int(rep.similarity.shape[0])
    writer = StreamingNpzWriter(path, n)
    writer.append(
        {
            "sample_index": audit["sample_index"],
            "similarity": rep.similarity.numpy(),
            "nearest_index": rep.nearest_index.numpy(),
            "l2_ratio": rep.l2_ratio.numpy(),
            "final_confidence": audit["final_confidence"],
            "gate": audit["gate"],
        }
    )
    return writer.close()
