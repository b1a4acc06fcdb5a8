"""Resumable training, shared by ``train_protector`` and ``train_diffusion``.

Both loops checkpoint the weights, the optimiser and the training generator together with an
*identity*: every setting that must match for a resumed run to continue the same run (data
hash, architecture, schedule hash, batch size, learning rate, seeds, ...; never ``steps``, so a
larger ``steps`` continues a finished run). This module holds the parts that are the same for
both: comparing identities, the resume-step check, and the optimiser state as safetensors
tensors plus a JSON-able rest. Where the files live and what else they hold is each loop's own
business (:mod:`cpsample_fast.protector.checkpoint`, :mod:`cpsample_fast.models.checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch


def as_json(obj: Any) -> Any:
    """``obj`` through JSON once, so tuples become lists exactly as in a stored copy."""
    return json.loads(json.dumps(obj, sort_keys=True))


def tensor_sha256(x: torch.Tensor) -> str:
    """Hash of the exact float32 bytes of ``x`` (resuming on other data must be refused)."""
    digest = hashlib.sha256()
    for chunk in x.detach().reshape(-1).split(1 << 20):
        digest.update(chunk.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_identity(saved: Mapping | None, identity: Mapping, *, where: str, retry: str) -> None:
    """Refuse to resume a run whose stored identity differs from this run's.

    Args:
        saved: The identity stored with the checkpoint (``None``: the checkpoint has none).
        identity: This run's identity.
        where: The checkpoint in words, e.g. ``"checkpoint 'run/ck.safetensors'"``.
        retry: The argument to point at instead, e.g. ``"checkpoint"``.

    Raises:
        ValueError: naming every differing key, or saying the checkpoint has no identity.
    """
    if saved is None:
        raise ValueError(
            f"{where} has no training identity (not written by this training loop, or by an "
            "older version); pass resume=False to start over"
        )
    if dict(saved) != dict(identity):
        diff = sorted(k for k in set(identity) | set(saved) if identity.get(k) != saved.get(k))
        raise ValueError(
            f"{where} holds a training run with different data or settings ({', '.join(diff)}); "
            f"pass resume=False to start over or use another {retry}"
        )


def check_resume_step(
    step: int, steps: int, *, where: str, retry: str, start_over: str = "resume=False"
) -> int:
    """``step`` when a run stored at ``step`` can continue to ``steps``; ValueError otherwise."""
    if step > steps:
        raise ValueError(
            f"{where} is already at step {step}, past steps={steps}; pass steps >= {step} to "
            f"continue it, {start_over} to start over, or another {retry}"
        )
    return step


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state as ``({"<param>.<key>": tensor}, rest)`` for safetensors + JSON.

    ``rest`` holds ``param_groups`` and the non-tensor per-parameter entries (``"plain"``),
    all JSON-able; :func:`load_optimizer_state` inverts it.
    """
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                plain[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def load_optimizer_state(
    opt: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    rest: Mapping[str, Any] | None = None,
) -> None:
    """Restore what :func:`optimizer_state` returned (``rest=None``: keep ``opt``'s groups)."""
    state: dict[int, dict[str, Any]] = {}
    plain = {} if rest is None else rest.get("plain", {})
    for name, value in [*tensors.items(), *plain.items()]:
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = opt.state_dict()["param_groups"] if rest is None else rest["param_groups"]
    opt.load_state_dict({"state": state, "param_groups": groups})
