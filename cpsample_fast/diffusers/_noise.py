"""Draw noise exactly as diffusers' pipelines do (``diffusers.utils.torch_utils.randn_tensor``).

No diffusers import: ``CPSampler.sample(generator=...)`` uses this so that a scale-0 run
reproduces a pipeline run from the same ``torch.Generator`` (docs/ALGORITHM.md §4: explicit
noise replaces the counter-based generator; Philox stays the default for scale-out).
"""

from __future__ import annotations

import torch


def check_generator(generator, batch: int) -> None:
    """A ``torch.Generator`` or a list of ``batch`` of them, as diffusers accepts."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(
                f"generator: a list of generators must have one per sample ({batch}), "
                f"got {len(generator)}"
            )
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator: expected torch.Generator objects in the list")
    elif not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}"
        )


def randn_like_diffusers(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """``randn_tensor(shape, generator=generator, device=device, dtype=dtype)`` of diffusers.

    A CPU generator draws on the CPU and the result moves to ``device``; a list of generators
    draws one sample from each.
    """
    device = torch.device(device)
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    gen_type = gens[0].device.type
    rand_device = device
    if gen_type != device.type:
        if gen_type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a {gen_type} generator")
        rand_device = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(tuple(shape), generator=gens[0], device=rand_device, dtype=dtype).to(
            device
        )
    one = (1, *tuple(shape)[1:])
    return torch.cat(
        [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in gens]
    ).to(device)
