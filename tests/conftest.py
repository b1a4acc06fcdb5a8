"""Shared test set-up: Triton runs on the CPU through its interpreter, so the
Triton kernels are tested on machines without a GPU.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here, at the
top of the first file pytest imports.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Parallel test workers on 2 cores: one thread each (two 2-thread processes run ~10x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _ci_requirements_missing() -> list[str]:
    """What a CI run needs but this environment lacks: the compiled ``_C`` and Triton.

    Without them the cpp/triton tests skip, and a skip in CI would hide a broken build.
    """
    import warnings

    from cpsample_fast.ops import _ext, has_triton

    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _ext.get_ext() is None:
            missing.append(f"cpsample_fast._C ({_ext.load_error()}; run `make build`)")
    if not has_triton():
        missing.append("triton (pip install triton)")
    return missing


def pytest_sessionstart(session):
    # CI (the CI variable set, as GitHub Actions and GitLab do): a missing accelerator fails the
    # run instead of turning its tests into skips.
    if os.environ.get("CI") and not os.environ.get("PYTEST_XDIST_WORKER"):
        missing = _ci_requirements_missing()
        if missing:
            raise pytest.UsageError(
                "CI is set, but these are missing (their tests would be skipped): "
                + "; ".join(missing)
            )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def write_tiny_assets():
    """Factory: write a tiny ``SmallUNet`` checkpoint and a briefly trained protector of
    ``members`` into a folder (``unet.safetensors``, ``protector/``), as the CLIs read them."""

    def write(folder, members, *, steps: int, batch_size: int):
        from cpsample_fast.models import SmallUNet, save_checkpoint
        from cpsample_fast.protector import save_protector, train_protector
        from cpsample_fast.schedule import NoiseSchedule

        schedule = NoiseSchedule()
        torch.manual_seed(0)
        unet = SmallUNet("tiny")
        meta = {"unet_config": unet.config.to_dict(), "schedule": schedule.to_config()}
        save_checkpoint(folder / "unet.safetensors", unet, meta)
        prot, report = train_protector(
            members, schedule=schedule, protector={"base_channels": 8}, steps=steps,
            batch_size=batch_size, progress=False,
        )  # fmt: skip
        save_protector(folder / "protector", prot, report)
        return folder

    return write
