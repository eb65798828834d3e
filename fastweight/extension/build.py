"""How ``fastweight._C`` is built: sources, flags, build key and the CPU-or-CUDA decision.

The one source of truth for both builds: ``setup.py`` (install time, loads this file by path,
so it imports nothing from fastweight and nothing beyond the standard library at module level)
and the JIT loader (:mod:`fastweight.extension.loader`, first use).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

CPU_SOURCES = ("ops.cpp", "aggregation.cpp")
CUDA_SOURCES = ("aggregation_cuda.cu", "aggregation_cuda_ops.cpp")
HEADERS = ("aggregation.h", "aggregation_cuda.h")
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
KEY_MARKER = b"fastweight-build-key:"


def source_hash(directory: Path) -> str:
    """Hash of every C++/CUDA source in ``directory`` (line endings normalised)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.suffix in SOURCE_SUFFIXES and path.is_file():
            digest.update(path.name.encode())
            digest.update(b"\0")
            digest.update(path.read_bytes().replace(b"\r\n", b"\n"))
            digest.update(b"\0")
    return "h" + digest.hexdigest()[:24]


def build_key(directory: Path, torch_version: str) -> str:
    """What a built library must match to be loaded: the sources and the exact torch version
    (the C++ ABI). It is compiled into the library and read back without loading it."""
    return "k" + hashlib.sha256(f"{source_hash(directory)}|{torch_version}".encode()).hexdigest()[:24]


def built_with(library: Path, key: str) -> bool:
    """Whether the shared object ``library`` was compiled with ``key`` (read, not loaded)."""
    try:
        data = Path(library).read_bytes()
    except OSError:
        return False
    return KEY_MARKER + key.encode() + b";" in data


def cuda_decision(torch_cuda_version: str | None, cuda_home: str | None, gpu_visible: bool) -> tuple[bool, str]:
    """(build the CUDA kernels?, why). Only with a CUDA torch, nvcc, and a GPU to read the
    architecture from or an explicit ``TORCH_CUDA_ARCH_LIST``: without both, torch's build
    helpers cannot choose an architecture and fail (a CUDA wheel on a machine with no GPU)."""
    if torch_cuda_version is None:
        return False, "CPU build of torch"
    if not cuda_home or not (Path(cuda_home) / "bin" / "nvcc").exists():
        return False, "no nvcc found"
    if not gpu_visible and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return False, "no GPU visible and TORCH_CUDA_ARCH_LIST unset"
    return True, "CUDA torch, nvcc and a target architecture"


@dataclass(frozen=True)
class BuildPlan:
    """Everything a compiler invocation needs, identical for setup.py and the JIT build."""
    sources: tuple[str, ...]    # file names inside the source folder
    with_cuda: bool
    key: str
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    ldflags: tuple[str, ...]


def plan(directory: Path, torch_version: str, with_cuda: bool) -> BuildPlan:
    """The sources and flags of a build of the sources in ``directory``."""
    key = build_key(directory, torch_version)
    defines = [f"-DFASTWEIGHT_BUILD_KEY={key}"] + (["-DFASTWEIGHT_WITH_CUDA"] if with_cuda else [])
    return BuildPlan(
        sources=CPU_SOURCES + (CUDA_SOURCES if with_cuda else ()),
        with_cuda=with_cuda,
        key=key,
        cflags=("-O3", "-fopenmp", *defines),
        cuda_cflags=("-O3", *defines),
        ldflags=("-fopenmp",),
    )
