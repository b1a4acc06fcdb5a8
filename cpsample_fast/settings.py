"""Guidance settings files: what ``cps.tune_guidance`` recommends, tied to one model and protector.

A settings JSON holds the sampler options (mode, α, s, guidance range, steps, η) and the
identity of the eps-model and the protector it was tuned for:

- ``model.sha256`` / ``protector.sha256``: :func:`module_sha256` of the module's state dict
  (names and float32 values, in name order), so the same weights give the same hash whatever
  file they came from;
- ``protector.fingerprint``: the training-set fingerprint the protector's checkpoint carries
  (``protector.dataset_fingerprint``), when known.

``load_settings(..., eps_model=, protector=)`` (and ``CPSampler.from_settings``,
``cpsample sample --settings``) refuse a file whose hashes name other weights, with a message
that says which one differs. The scores the tuner measured are kept beside, for the record.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

SETTINGS_FORMAT = "cpsample-guidance-settings/1"
SAMPLER_KEYS = ("mode", "alpha", "scale", "guidance_range", "num_inference_steps", "eta")
# Optional keys, with the value files written before them mean.
SAMPLER_DEFAULTS = {"solver": "ddim", "final_sigmas_type": "zero"}


def module_sha256(module) -> str:
    """sha256 of a module's state dict: each name, shape and float32 value, in name order.

    Floating tensors are hashed as float32 (a bf16 copy of fp32 weights hashes differently:
    tune and verify with the same weights); integer buffers as int64.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"cannot identify a {type(module).__name__}: settings files identify models by the "
            "hash of an nn.Module's state dict"
        )
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        v = value.detach().to("cpu")
        v = v.float() if v.is_floating_point() else v.long()
        digest.update(f"{name}:{list(v.shape)}:{v.dtype};".encode())
        digest.update(v.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_sampler(d: Mapping[str, Any]) -> dict:
    from .guidance import check_alpha, mode_id

    missing = [k for k in SAMPLER_KEYS if k not in d]
    if missing:
        raise ValueError(f"settings 'sampler' lacks {', '.join(missing)}")
    mode_id(d["mode"])
    check_alpha(d["alpha"])
    if not float(d["scale"]) >= 0:
        raise ValueError(f"settings scale must be >= 0, got {d['scale']}")
    gr = d["guidance_range"]
    if gr is not None and (len(gr) != 2 or int(gr[0]) > int(gr[1])):
        raise ValueError(f"settings guidance_range must be null or [t_min, t_max], got {gr}")
    return {
        "mode": d["mode"],
        "alpha": float(d["alpha"]),
        "scale": float(d["scale"]),
        "guidance_range": None if gr is None else (int(gr[0]), int(gr[1])),
        "num_inference_steps": int(d["num_inference_steps"]),
        "eta": float(d["eta"]),
        "solver": str(d.get("solver", SAMPLER_DEFAULTS["solver"])),
        "final_sigmas_type": str(d.get("final_sigmas_type", SAMPLER_DEFAULTS["final_sigmas_type"])),
    }


def make_settings(
    sampler: Mapping[str, Any],
    eps_model,
    protector,
    *,
    protector_meta: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """A settings dict (JSON-able) for ``sampler`` options, bound to these two modules."""
    from . import __version__

    s = _check_sampler(sampler)
    s["guidance_range"] = None if s["guidance_range"] is None else list(s["guidance_range"])
    fp = None
    if protector_meta is not None and "fingerprint" in protector_meta:
        fp = dict(protector_meta["fingerprint"])
    out = {
        "format": SETTINGS_FORMAT,
        "package_version": __version__,
        "sampler": s,
        "model": {"sha256": module_sha256(eps_model), "class": type(eps_model).__qualname__},
        "protector": {
            "sha256": module_sha256(protector),
            "class": type(protector).__qualname__,
            "fingerprint": fp,
        },
    }
    if extra:
        out.update(extra)
    return out


def save_settings(path: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Write a settings dict as JSON, atomically."""
    from .io import write_json_atomic

    return write_json_atomic(path, dict(settings))


def load_settings(
    path_or_dict,
    *,
    eps_model=None,
    protector=None,
    protector_meta: Mapping[str, Any] | None = None,
) -> dict:
    """Read and check a settings file (or dict); verify it against the modules given.

    Args:
        path_or_dict: a settings JSON path or the dict itself.
        eps_model, protector: when given, their :func:`module_sha256` must equal the recorded
            ones.
        protector_meta: the protector checkpoint's metadata; when both it and the file carry a
            training-set fingerprint they must agree.

    Returns:
        The settings dict, with ``sampler`` validated (``guidance_range`` a tuple or None).

    Raises:
        ValueError: wrong format, bad sampler options, or a model / protector / training-set
            mismatch (the message names which).
    """
    if isinstance(path_or_dict, Mapping):
        d = json.loads(json.dumps(dict(path_or_dict)))
        where = "settings"
    else:
        from .io import read_json

        where = f"settings file {str(path_or_dict)!r}"
        if not Path(path_or_dict).is_file():
            raise FileNotFoundError(f"{where} not found")
        d = read_json(path_or_dict)
    if not isinstance(d, dict) or d.get("format") != SETTINGS_FORMAT:
        raise ValueError(f"{where} is not a {SETTINGS_FORMAT} file (written by cpsample tune)")
    try:
        d["sampler"] = _check_sampler(d.get("sampler") or {})
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
    problems = []
    for name, module in (("eps_model", eps_model), ("protector", protector)):
        if module is None:
            continue
        key = "model" if name == "eps_model" else "protector"
        want = (d.get(key) or {}).get("sha256")
        got = module_sha256(module)
        if want != got:
            problems.append(
                f"{name} differs: the settings were tuned for {key} sha256 {str(want)[:12]}…, "
                f"this {name} ({type(module).__name__}) has {got[:12]}…"
            )
    stored_fp = (d.get("protector") or {}).get("fingerprint")
    if protector_meta is not None and stored_fp and "fingerprint" in protector_meta:
        if protector_meta["fingerprint"].get("sha256") != stored_fp.get("sha256"):
            problems.append(
                "protector training set differs: the settings were tuned for a protector of "
                f"{stored_fp.get('count')} images with fingerprint "
                f"{stored_fp.get('sha256', '')[:12]}…"
            )
    if problems:
        raise ValueError(f"{where} does not belong to these models: " + "; ".join(problems))
    return d


def sampler_kwargs(settings: Mapping[str, Any]) -> dict:
    """``CPSampler`` keyword arguments from a (loaded) settings dict."""
    s = settings["sampler"]
    return {k: s.get(k, SAMPLER_DEFAULTS.get(k)) for k in (*SAMPLER_KEYS, *SAMPLER_DEFAULTS)}
