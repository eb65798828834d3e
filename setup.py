"""Build script: maps ``kernels/`` to ``fastweight.kernels`` and builds ``fastweight._C``.

The extension is optional: ``FASTWEIGHT_BUILD_EXT=0`` skips it, and a missing compiler only
means the package JIT-builds it on first use (or falls back to PyTorch, with a warning).
A failed build of the extension warns and never fails the install.

The C++/CUDA sources in ``csrc/`` ship as package data (``fastweight/csrc``) for the JIT build.
``fastweight._C`` is a ``CppExtension``, or a ``CUDAExtension`` when torch is a CUDA build and
nvcc is found. Flags and the source hash must agree with ``fastweight/aggregation_ext.py``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
CPU_SOURCES = ["ops.cpp", "aggregation.cpp"]
CUDA_SOURCES = ["aggregation_cuda.cu", "aggregation_cuda_ops.cpp"]
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def _note(msg: str) -> None:
    print(f"fastweight setup: {msg}", file=sys.stderr, flush=True)


def _source_hash() -> str:
    """Same as fastweight.aggregation_ext.source_hash (the loader compares the two)."""
    h = hashlib.sha256()
    for f in sorted((ROOT / CSRC).iterdir()):
        if f.suffix in SOURCE_SUFFIXES and f.is_file():
            h.update(f.name.encode())
            h.update(b"\0")
            h.update(f.read_bytes().replace(b"\r\n", b"\n"))
            h.update(b"\0")
    return "h" + h.hexdigest()[:24]


def _extension():
    """([Extension], cmdclass), or ([], {}) when the extension is not to be built here."""
    if os.environ.get("FASTWEIGHT_BUILD_EXT", "1").strip() == "0":
        _note("FASTWEIGHT_BUILD_EXT=0: not building fastweight._C")
        return [], {}
    if not (ROOT / CSRC / "ops.cpp").is_file():
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001
        _note(f"torch not importable at build time ({exc}); fastweight._C will be JIT-built on first use")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        _note(f"no C++ compiler ({cxx!r} not on PATH): not building fastweight._C; PyTorch ops will be used")
        return [], {}

    home = cpp_extension.CUDA_HOME
    with_cuda = torch.version.cuda is not None and bool(home) and (Path(home) / "bin" / "nvcc").exists()
    # Same as fastweight.aggregation_ext.build_key: the loader skips a build for other sources
    # or another torch (a pip build in an isolated environment may have used another torch).
    key = "k" + hashlib.sha256(f"{_source_hash()}|{torch.__version__}".encode()).hexdigest()[:24]
    defines = [f"-DFASTWEIGHT_BUILD_KEY={key}", "-DFASTWEIGHT_PYTHON_MODULE"]
    if with_cuda:
        defines.append("-DFASTWEIGHT_WITH_CUDA")
    sources = [f"{CSRC}/{f}" for f in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = make(
        "fastweight._C",
        sources,
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": ["-O3", "-fopenmp", *defines], "nvcc": ["-O3", *defines]},
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed build warns; the package then JIT-builds or uses PyTorch at run time."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                _note(f"WARNING: building fastweight._C failed ({type(exc).__name__}: {exc}); "
                      "fastweight will try a JIT build on first use, else use PyTorch")
                self.extensions = []  # nothing to copy or install

    _note(f"building fastweight._C as a {'CUDAExtension' if with_cuda else 'CppExtension'}")
    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extension()

# fastweight and its subpackages (fastweight.hf, ...), kernels/ as fastweight.kernels, csrc/ as data.
PACKAGES = ["fastweight", *(f"fastweight.{p}" for p in find_packages("fastweight")), "fastweight.kernels",
            "fastweight.csrc"]

setup(
    packages=PACKAGES,
    package_dir={"fastweight": "fastweight", "fastweight.kernels": "kernels", "fastweight.csrc": CSRC},
    package_data={"fastweight.csrc": [f"*{s}" for s in SOURCE_SUFFIXES]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
