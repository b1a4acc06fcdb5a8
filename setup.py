"""Build of the extension cpsample_fast._C, driven by CMake (CMakeLists.txt).

`python setup.py build_ext --inplace` (`make build`) and
`pip install --no-build-isolation -e ".[test]"` both put `_C*.so` into `cpsample_fast/`.

The C++ CPU kernels are always built. The CUDA kernels are built when torch has CUDA
(`torch.version.cuda`) and nvcc is found (`$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, torch's
own `torch.utils.cpp_extension.CUDA_HOME`, `/usr/local/cuda/bin/nvcc`, or `nvcc` on PATH), with
`-lineinfo`. `_C.build_info()["cuda_archs"]` records the architectures, and the `cuda` backend is
offered only on GPUs they cover. Environment overrides:

- `CPSAMPLE_BUILD_CUDA=1` forces the CUDA part (fails without nvcc), `=0` skips it.
- `CPSAMPLE_CPU_ARCH=x86-64-v3` (or `native` for a local build) sets `-march`; the default is the
  compiler's portable baseline, as a wheel needs.
- `CPSAMPLE_CUDA_ARCHS="80;90"` sets the CUDA architectures (CMake list; "90" embeds sm_90 code
  and compute_90 PTX, which newer GPUs JIT-compile at first use).
- `CMAKE_BUILD_PARALLEL_LEVEL` sets the build jobs (default 2).

CMake finds torch with `find_package(Torch)` (`torch.utils.cmake_prefix_path`) and pybind11 with
`pybind11.get_cmake_dir()`. One exception: a CUDA-enabled torch on a machine without a CUDA
toolkit, whose TorchConfig.cmake refuses to load; then the CPU part links torch's libraries
directly (`CPSAMPLE_TORCH_FIND_PACKAGE=0` forces this path, to test it).
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools only sees its name."""

    def __init__(self, name: str, source_dir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


def _torch_cuda_home() -> str | None:
    """torch's own toolkit detection (``torch.utils.cpp_extension.CUDA_HOME``), or None."""
    try:
        from torch.utils import cpp_extension
    except Exception:  # an old or broken torch: fall back to our own search
        return None
    return getattr(cpp_extension, "CUDA_HOME", None)


def _find_nvcc() -> str | None:
    """Returns the nvcc to use, or None: $CUDA_HOME, $CUDA_PATH, torch's ``CUDA_HOME`` (what
    torch.utils.cpp_extension builds with), /usr/local/cuda, then PATH."""
    homes = (
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        _torch_cuda_home(),
        "/usr/local/cuda",
    )
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_decision(torch_cuda: str | None, nvcc: str | None) -> tuple[bool, str]:
    """Decides whether to build the CUDA part. Returns (build_cuda, one-line reason)."""
    forced = os.environ.get("CPSAMPLE_BUILD_CUDA", "").strip().lower()
    if forced in ("0", "off", "false", "no"):
        return False, "CPSAMPLE_BUILD_CUDA=0"
    if forced in ("1", "on", "true", "yes"):
        if nvcc is None:
            raise RuntimeError(
                "CPSAMPLE_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit"
            )
        return True, f"forced by CPSAMPLE_BUILD_CUDA=1 (nvcc {nvcc})"
    if forced:
        raise ValueError(f"CPSAMPLE_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if torch_cuda is None:
        return False, "torch is a CPU-only build (torch.version.cuda is None)"
    if nvcc is None:
        return False, f"torch has CUDA {torch_cuda} but nvcc was not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch_cuda}, nvcc {nvcc}"


def _torch_arch(arch: str) -> str:
    """CMake's CUDA arch ("90", "90a", "100a") in TORCH_CUDA_ARCH_LIST form ("9.0", "9.0a")."""
    suffix = arch[-1] if arch[-1].isalpha() else ""
    digits = arch[: len(arch) - len(suffix)]
    return f"{digits[:-1]}.{digits[-1]}{suffix}"


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja into the extension's output folder."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11
        import torch.utils

        start = time.perf_counter()
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)

        nvcc = _find_nvcc()
        build_cuda, reason = _cuda_decision(torch.version.cuda, nvcc)
        parts = "C++ CPU + CUDA" if build_cuda else "C++ CPU only"
        print(f"cpsample_fast: building {parts} extension: {reason}", flush=True)

        prefix_path = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        args = [
            f"-DCMAKE_PREFIX_PATH={prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCPSAMPLE_BUILD_CUDA={'ON' if build_cuda else 'OFF'}",
            f"-DCPSAMPLE_CPU_ARCH={os.environ.get('CPSAMPLE_CPU_ARCH', '')}",
        ]
        # A CUDA torch's TorchConfig.cmake fails without a CUDA toolkit, even for CPU-only use.
        torch_cmake = os.environ.get("CPSAMPLE_TORCH_FIND_PACKAGE", "").strip()
        use_find_package = torch.version.cuda is None or nvcc is not None
        if torch_cmake in ("0", "1"):  # for testing the fallback
            use_find_package = torch_cmake == "1"
        if build_cuda and not use_find_package:
            raise RuntimeError(
                "the CUDA part needs find_package(Torch) (CPSAMPLE_TORCH_FIND_PACKAGE)"
            )
        args += [
            f"-DCPSAMPLE_TORCH_FIND_PACKAGE={'ON' if use_find_package else 'OFF'}",
            f"-DCPSAMPLE_TORCH_DIR={Path(torch.__file__).parent}",
            f"-DCPSAMPLE_TORCH_VERSION={torch.__version__}",
            f"-DCPSAMPLE_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        ]
        if nvcc is not None:
            # torch's cuda.cmake (legacy FindCUDA) would take the toolkit root from `nvcc` on PATH,
            # which may be a wrapper script outside the toolkit (/usr/local/bin/nvcc here).
            cuda_root = Path(nvcc).resolve().parent.parent
            args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}", f"-DCUDAToolkit_ROOT={cuda_root}"]
        env = dict(os.environ)
        if build_cuda:
            archs = os.environ.get("CPSAMPLE_CUDA_ARCHS", "80;90")
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCPSAMPLE_CUDA_ARCHS={archs}"]
            # torch's CMake config computes its own arch flags (we discard them); keep it from
            # probing or listing architectures this toolkit may not know.
            arch_list = ";".join(_torch_arch(a) for a in archs.split(";") if a[:2].isdigit())
            env.setdefault("TORCH_CUDA_ARCH_LIST", arch_list)
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg

                ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
            except ImportError:
                ninja = None
        if ninja is not None:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found: pip install cmake (CMake >= 3.18 is needed)")

        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        subprocess.run(
            [cmake, "-S", ext.source_dir, "-B", str(build_dir), *args], check=True, env=env
        )
        subprocess.run(
            [cmake, "--build", str(build_dir), "--config", "Release", "--parallel", jobs],
            check=True,
        )
        print(
            f"cpsample_fast: built {parts} extension in {time.perf_counter() - start:.1f} s",
            flush=True,
        )


setup(
    ext_modules=[CMakeExtension("cpsample_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
