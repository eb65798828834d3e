"""Loading ``fastweight._C``, the C++/CUDA loss-aggregation kernels (sources in ``csrc/``).

Loading happens once per process, on first use, in this order:

1. the prebuilt ``fastweight._C`` that ``setup.py`` built at install time, unless it is stale
   (other sources, or another torch: an isolated pip build may have used another torch);
2. else a JIT build with ``torch.utils.cpp_extension.load`` and ninja into
   ``$FASTWEIGHT_CACHE/ext-<key>`` (default ``~/.cache/fastweight``); one line on stderr says so;
3. else (``FASTWEIGHT_BUILD_EXT=0``, no compiler or ninja, a failed build) :func:`load` reports
   it unavailable: one warning line with the compiler's first error, and the backend registry
   uses another aggregation backend, with the same results.

What is built is decided by :mod:`fastweight.extension.build`, which setup.py uses too.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from fastweight import env
from fastweight.extension import build

_JIT_NAME = "fastweight_agg_ext"


@dataclass(frozen=True)
class Status:
    """The outcome of loading: whether the ops exist, on which devices, and why (one line)."""
    available: bool
    devices: frozenset[str]
    reason: str


_lock = threading.Lock()
_status: Status | None = None


def source_dir() -> Path | None:
    """The C++/CUDA sources: ``fastweight/csrc`` (installed package data) or the repo's ``csrc``."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / f).is_file() for f in build.CPU_SOURCES + build.CUDA_SOURCES + build.HEADERS):
            return candidate
    return None


def cache_root() -> Path:
    """Where JIT builds go: ``FASTWEIGHT_CACHE``, else ``$XDG_CACHE_HOME/fastweight``."""
    configured = env.get("FASTWEIGHT_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fastweight"


def cuda_decision() -> tuple[bool, str]:
    """Whether this machine's JIT build compiles the CUDA kernels, and why."""
    from torch.utils import cpp_extension

    return build.cuda_decision(torch.version.cuda, cpp_extension.CUDA_HOME, torch.cuda.is_available())


def first_error_line(text: str) -> str:
    """The compiler's first error out of a build log; else the log's last non-empty line (a
    Python exception's message comes last)."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line or "error :" in line or line.startswith("ptxas fatal"):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _ops_registered() -> bool:
    try:
        torch.ops.fastweight.agg_ext_info
    except (AttributeError, RuntimeError):
        return False
    return True


def _try_prebuilt(src: Path | None) -> tuple[bool, str]:
    if not env.flag("FASTWEIGHT_EXT_PREBUILT"):
        return False, "prebuilt fastweight._C skipped (FASTWEIGHT_EXT_PREBUILT=0)"
    try:
        spec = importlib.util.find_spec("fastweight._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return False, "no prebuilt fastweight._C"
    if src is not None and not build.built_with(Path(spec.origin), build.build_key(src, torch.__version__)):
        return False, f"prebuilt fastweight._C is stale (other sources or not torch {torch.__version__})"
    try:
        importlib.import_module("fastweight._C")
    except Exception as exc:  # built against another torch, missing symbols, ...
        return False, f"prebuilt fastweight._C failed to import ({type(exc).__name__}: {exc})"
    return True, "built extension fastweight._C"


def _try_jit(src: Path | None, why_not_prebuilt: str) -> tuple[bool, str, bool]:
    """(ok, reason, warn): warn when the user should hear that another backend takes over."""
    if src is None:
        return False, f"C++ sources not found next to the package ({why_not_prebuilt})", True
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        return False, f"no C++ compiler: {compiler!r} not found on PATH ({why_not_prebuilt})", True
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return False, f"ninja not found, needed for the JIT build ({why_not_prebuilt})", True

    with_cuda, cuda_why = cuda_decision()
    recipe = build.plan(src, torch.__version__, with_cuda)
    identity = "|".join([recipe.key, str(torch.version.cuda), sys.version, platform.machine(), compiler,
                         str(with_cuda), os.environ.get("TORCH_CUDA_ARCH_LIST", "")])
    build_dir = cache_root() / f"ext-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    failed_marker = build_dir / "build_failed.txt"
    if failed_marker.is_file():  # do not recompile, and fail again, in every new process
        why = failed_marker.read_text(errors="replace").strip()
        return False, f"JIT build failed earlier ({why}); delete {build_dir} to retry", True
    kind = "C++/CUDA" if with_cuda else f"C++ (CPU only: {cuda_why})"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob(f"{_JIT_NAME}*.so")):
            print(f"fastweight: JIT-building the {kind} aggregation extension in {build_dir} "
                  f"(first use only; {why_not_prebuilt})", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=_JIT_NAME, sources=[str(src / f) for f in recipe.sources],
            extra_cflags=list(recipe.cflags), extra_cuda_cflags=list(recipe.cuda_cflags),
            extra_ldflags=list(recipe.ldflags), extra_include_paths=[str(src)],
            build_directory=str(build_dir), with_cuda=with_cuda, is_python_module=False, verbose=False,
        )
    except Exception as exc:
        why = f"{type(exc).__name__}: {first_error_line(str(exc) or repr(exc))}"
        try:
            failed_marker.write_text(why + "\n")
        except OSError:
            pass
        return False, f"JIT build failed in {build_dir}: {why}", True
    return True, f"JIT-built {kind} in {build_dir}", False


def _warn(message: str) -> None:
    # Attributed to no source line, so the warning prints as exactly one line.
    warnings.warn_explicit(f"fastweight: C++ aggregation extension unavailable, using another backend: "
                           f"{message}", RuntimeWarning, filename="fastweight._C", lineno=0)


def load() -> Status:
    """Load the extension once per process (building it if needed) and report the outcome."""
    global _status
    with _lock:
        if _status is not None:
            return _status
        if not env.flag("FASTWEIGHT_BUILD_EXT"):
            _status = Status(False, frozenset(), "disabled by FASTWEIGHT_BUILD_EXT=0")
            return _status
        src = source_dir()
        warn = False
        if _ops_registered():  # e.g. `import fastweight._C` by hand: loading again would clash
            ok, why = True, "extension already loaded in this process"
        else:
            ok, why = _try_prebuilt(src)
        if not ok:
            ok, why, warn = _try_jit(src, why)
        devices: frozenset[str] = frozenset()
        if ok:
            info = str(torch.ops.fastweight.agg_ext_info())
            devices = frozenset(info.split()[0].removeprefix("devices=").split(","))
            why += f" ({'+'.join(sorted(devices))} kernels)"
        elif warn:
            _warn(why)
        _status = Status(ok, devices, why)
        return _status
