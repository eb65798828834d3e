"""Build script: maps ``kernels/`` to ``fastweight.kernels`` and builds ``fastweight._C``.

The extension is optional: ``FASTWEIGHT_BUILD_EXT=0`` skips it, and a missing compiler or a
failed build only means the package JIT-builds it on first use (or uses another backend, with
one warning). A failed build of the extension never fails the install.

What is built (sources, flags, build key, CPU or CUDA) comes from
``fastweight/extension/build.py``, loaded here by path: the JIT loader uses the same file.
The C++/CUDA sources in ``csrc/`` ship as package data (``fastweight/csrc``) for the JIT build.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _note(msg: str) -> None:
    print(f"fastweight setup: {msg}", file=sys.stderr, flush=True)


def load_build_recipe():
    """``fastweight/extension/build.py`` as a module, without importing the fastweight package."""
    spec = importlib.util.spec_from_file_location("fastweight_build_recipe",
                                                  ROOT / "fastweight" / "extension" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def extension():
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
        _note(f"no C++ compiler ({cxx!r} not on PATH): not building fastweight._C")
        return [], {}

    recipe = load_build_recipe()
    with_cuda, why = recipe.cuda_decision(torch.version.cuda, cpp_extension.CUDA_HOME, torch.cuda.is_available())
    plan = recipe.plan(ROOT / CSRC, torch.__version__, with_cuda)
    python_module = ["-DFASTWEIGHT_PYTHON_MODULE"]
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = make(
        "fastweight._C",
        [f"{CSRC}/{f}" for f in plan.sources],
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": [*plan.cflags, *python_module], "nvcc": [*plan.cuda_cflags, *python_module]},
        extra_link_args=list(plan.ldflags),
    )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed build warns; the package then JIT-builds or uses another backend at run time."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                _note(f"WARNING: building fastweight._C failed ({type(exc).__name__}: {exc}); "
                      "fastweight will try a JIT build on first use")
                self.extensions = []  # nothing to copy or install

    _note(f"building fastweight._C as a {'CUDAExtension' if with_cuda else 'CppExtension'} ({why})")
    return [ext], {"build_ext": OptionalBuildExt}


# fastweight and its subpackages, kernels/ as fastweight.kernels, csrc/ as data.
PACKAGES = ["fastweight", *(f"fastweight.{p}" for p in find_packages("fastweight")), "fastweight.kernels",
            "fastweight.csrc"]

if __name__ == "__main__":  # pip runs this file as __main__; tests import it to read the plan
    ext_modules, cmdclass = extension()
    setup(
        packages=PACKAGES,
        package_dir={"fastweight": "fastweight", "fastweight.kernels": "kernels", "fastweight.csrc": CSRC},
        package_data={"fastweight.csrc": [f"*{s}" for s in load_build_recipe().SOURCE_SUFFIXES]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
