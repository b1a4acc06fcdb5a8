"""Which backend runs the fused ops: the one resolution shared by every ``cpsample::`` op.

``BACKENDS`` are the names an op accepts; :func:`resolve_backend` turns one of them into the
concrete backend for a device (or raises saying why it cannot run there), and
:func:`available_backends` lists what runs on a device, best first (``"auto"`` picks the first).
"""

from __future__ import annotations

import torch

from . import _triton as _triton_impl

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")

_BUILD_HINT = (
    "build it with `make build` (python setup.py build_ext --inplace), or pass backend='torch'"
)


def get_ext():
    """The compiled ``cpsample_fast._C`` module, or None when it is not built."""
    try:
        from . import _ext
    except ImportError:
        return None
    return _ext.get_ext()


def _ext_has_cuda(ext) -> bool:
    info = getattr(ext, "build_info", None)
    return bool(info is not None and info().get("cuda", False))


def _device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _cuda_arch_problem(ext, device: torch.device) -> str | None:
    """Why ``_C``'s CUDA kernels cannot run on ``device``'s GPU, or None when they can.

    A build whose arch list does not cover the GPU would fail at the first launch with "no kernel
    image is available"; an older build that does not record its archs is given the benefit of
    the doubt.
    """
    from . import _ext

    info = ext.build_info() if hasattr(ext, "build_info") else {}
    archs = info.get("cuda_archs")
    if not archs:
        return None
    capability = _device_capability(device)
    listed = [a for a in str(archs).replace(";", ",").split(",") if a.strip()]
    if any(_ext.arch_covers(a, capability) for a in listed):
        return None
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
    return (
        f"cpsample_fast._C's CUDA kernels were built for archs {';'.join(listed)}, which do not "
        f"cover this GPU ({name}, sm_{capability[0]}{capability[1]}); rebuild with "
        f"{_ext.arch_hint(capability)} (or add {capability[0]}{capability[1]} to the list)"
    )


def available_backends(device: torch.device | str) -> list[str]:
    """Concrete backends that can run the fused ops on tensors of ``device``, best first.

    ``"cuda"`` is offered only when ``_C``'s CUDA kernels were built for an architecture that
    covers the GPU (``_ext.arch_covers``). The first entry is what ``backend="auto"`` picks.
    ``"triton"`` on CPU (the interpreter, for tests) is listed last: it is far slower than the
    others.
    """
    device = torch.device(device)
    ext = get_ext()
    names: list[str] = []
    if device.type == "cuda":
        if _triton_impl.supports_device(device):
            names.append("triton")
        if ext is not None and _ext_has_cuda(ext) and _cuda_arch_problem(ext, device) is None:
            names.append("cuda")
        names.append("torch")
    elif device.type == "cpu":
        if ext is not None:
            names.append("cpp")
        names.append("torch")
        if _triton_impl.supports_device(device):
            names.append("triton")
    else:
        names.append("torch")
    return names


_RESOLVED: dict[tuple[str, str], str] = {}


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for ``backend`` on ``device``; raise if it cannot run there."""
    device = torch.device(device)
    key = (backend, device.type)
    name = _RESOLVED.get(key)
    if name is not None:
        return name
    if backend == "auto":
        name = available_backends(device)[0]
    elif backend == "torch":
        name = "torch"
    elif backend == "triton":
        if not _triton_impl.has_triton():
            raise RuntimeError("backend='triton' needs Triton (pip install triton)")
        if not _triton_impl.supports_device(device):
            raise RuntimeError(
                f"backend='triton' cannot run on {device.type} tensors here: it needs CUDA tensors "
                "(or CPU tensors with TRITON_INTERPRET=1 set before cpsample_fast is imported)"
            )
        name = "triton"
    elif backend in ("cpp", "cuda"):
        want = "cpu" if backend == "cpp" else "cuda"
        if device.type != want:
            raise ValueError(
                f"backend={backend!r} runs on {want} tensors, got tensors on {device}; use "
                "backend='auto'"
            )
        ext = get_ext()
        if ext is None:
            raise RuntimeError(
                f"backend={backend!r} needs the compiled extension cpsample_fast._C, which is not "
                f"built; {_BUILD_HINT}"
            )
        if backend == "cuda" and not _ext_has_cuda(ext):
            raise RuntimeError(
                "backend='cuda' needs cpsample_fast._C built with its CUDA part (a CUDA toolkit "
                f"and a CUDA-enabled torch at build time); {_BUILD_HINT}"
            )
        if backend == "cuda":
            problem = _cuda_arch_problem(ext, device)
            if problem is not None:
                raise RuntimeError(f"backend='cuda': {problem}")
        name = backend
    else:
        raise ValueError(f"guided_update: backend must be one of {BACKENDS}, got {backend!r}")
    _RESOLVED[key] = name
    return name
