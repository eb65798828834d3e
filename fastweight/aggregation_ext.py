"""The loss-aggregation ops of the C++/CUDA extension ``fastweight._C`` (sources in ``csrc/``).

Same contract as :mod:`fastweight.aggregation_torch` (``coefficients``, ``segment_mean``,
``segment_mean_backward``), backed by the ops ``torch.ops.fastweight.agg_coefficients``,
``agg_segment_mean`` and ``agg_segment_mean_backward``. This module also registers their fake
(meta) kernels, so that ``torch.compile`` traces them, and their autograd.

Loading is lazy (first call of any function here) and happens once per process:

1. the prebuilt ``fastweight._C`` that ``setup.py`` built at install time, unless it is stale
   (built from other sources than the ones next to this package, or against another torch
   version: an isolated pip build may pick another torch) or fails to import;
2. else a JIT build with ``torch.utils.cpp_extension.load`` and ninja into
   ``$FASTWEIGHT_CACHE/ext-<key>`` (default ``~/.cache/fastweight``), where the key hashes the
   sources, torch, Python and the compiler; one line on stderr says that it builds;
3. else (``FASTWEIGHT_BUILD_EXT=0``, no compiler, a failed build) ``available()`` is False,
   with one warning, and the dispatch uses the PyTorch backend: results never change.

``FASTWEIGHT_EXT_PREBUILT=0`` skips step 1 (tests of the JIT path, debugging).
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
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "available", "status", "coefficients", "segment_mean", "segment_mean_backward",
    "source_dir", "source_hash", "build_key",
]

# Shipped sources: the CPU build compiles _CPU_SOURCES, a CUDA build adds _CUDA_SOURCES.
_CPU_SOURCES = ("ops.cpp", "aggregation.cpp")
_CUDA_SOURCES = ("aggregation_cuda.cu", "aggregation_cuda_ops.cpp")
_HEADERS = ("aggregation.h", "aggregation_cuda.h")
_SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
_KEY_MARKER = b"fastweight-build-key:"
_JIT_NAME = "fastweight_agg_ext"

_lock = threading.RLock()
_state: tuple[bool, str] | None = None  # (available, one-line reason)
_cuda_kernels = False                   # the loaded library has CUDA kernels
_registered = False


# ---------------------------------------------------------------- sources and build keys

def source_dir() -> Path | None:
    """The C++/CUDA sources: ``fastweight/csrc`` (installed package data) or the repo's ``csrc``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / f).is_file() for f in _CPU_SOURCES + _CUDA_SOURCES + _HEADERS):
            return cand
    return None


def source_hash(directory: Path) -> str:
    """Hash of the sources; setup.py computes the same one and compiles it into the library."""
    h = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        if f.suffix in _SOURCE_SUFFIXES and f.is_file():
            h.update(f.name.encode())
            h.update(b"\0")
            h.update(f.read_bytes().replace(b"\r\n", b"\n"))
            h.update(b"\0")
    return "h" + h.hexdigest()[:24]


def build_key(src_hash: str) -> str:
    """What a build must match: the sources and the exact torch version (the C++ ABI)."""
    return "k" + hashlib.sha256(f"{src_hash}|{torch.__version__}".encode()).hexdigest()[:24]


def _built_with(path: str, key: str) -> bool:
    """Whether a shared object was compiled with this build key (read, not loaded)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    return _KEY_MARKER + key.encode() + b";" in data


def _cache_root() -> Path:
    env = os.environ.get("FASTWEIGHT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fastweight"


def _cuda_buildable() -> bool:
    if torch.version.cuda is None:
        return False
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    return bool(home) and (Path(home) / "bin" / "nvcc").exists()


def _compile_flags(src_hash: str, with_cuda: bool) -> tuple[list[str], list[str], list[str]]:
    """(cflags, cuda_cflags, ldflags) shared by the JIT build; setup.py uses the same ones."""
    defines = [f"-DFASTWEIGHT_BUILD_KEY={build_key(src_hash)}"] + (["-DFASTWEIGHT_WITH_CUDA"] if with_cuda else [])
    return ["-O3", "-fopenmp", *defines], ["-O3", *defines], ["-fopenmp"]


# ---------------------------------------------------------------- loading

def _try_prebuilt(src: Path | None) -> tuple[bool, str]:
    if os.environ.get("FASTWEIGHT_EXT_PREBUILT", "1").strip() == "0":
        return False, "prebuilt fastweight._C skipped (FASTWEIGHT_EXT_PREBUILT=0)"
    try:
        spec = importlib.util.find_spec("fastweight._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return False, "no prebuilt fastweight._C"
    if src is not None and os.environ.get("FASTWEIGHT_BUILD_EXT", "1") != "0":
        if not _built_with(spec.origin, build_key(source_hash(src))):
            return False, f"prebuilt fastweight._C is stale (other sources or not torch {torch.__version__})"
    try:
        importlib.import_module("fastweight._C")
    except Exception as exc:  # built against another torch, missing symbols, ...
        return False, f"prebuilt fastweight._C failed to import ({type(exc).__name__}: {exc})"
    return True, "built extension fastweight._C"


def _try_jit(src: Path | None, why_not_prebuilt: str) -> tuple[bool, str, bool]:
    """(ok, reason, warn): warn when the user should hear that PyTorch takes over."""
    if os.environ.get("FASTWEIGHT_BUILD_EXT", "1").strip() == "0":
        return False, f"disabled by FASTWEIGHT_BUILD_EXT=0 ({why_not_prebuilt})", False
    if src is None:
        return False, f"C++ sources not found next to the package ({why_not_prebuilt})", True
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return False, f"no C++ compiler: {cxx!r} not found on PATH ({why_not_prebuilt})", True
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return False, f"ninja not found, needed for the JIT build ({why_not_prebuilt})", True

    with_cuda = _cuda_buildable()
    src_hash = source_hash(src)
    key_text = "|".join([src_hash, torch.__version__, str(torch.version.cuda), sys.version, platform.machine(),
                         cxx, str(with_cuda)])
    build_dir = _cache_root() / f"ext-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}"
    sources = [str(src / f) for f in _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())]
    cflags, cuda_cflags, ldflags = _compile_flags(src_hash, with_cuda)
    failed_marker = build_dir / "build_failed.txt"
    if failed_marker.is_file():  # do not recompile, and fail again, in every new process
        why = failed_marker.read_text(errors="replace").strip()
        return False, f"JIT build failed earlier ({why}); delete {build_dir} to retry", True
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob(f"{_JIT_NAME}*.so")):
            print(f"fastweight: JIT-building the C++{'/CUDA' if with_cuda else ''} aggregation extension in "
                  f"{build_dir} (first use only; {why_not_prebuilt})", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=_JIT_NAME, sources=sources, extra_cflags=cflags, extra_cuda_cflags=cuda_cflags,
            extra_ldflags=ldflags, extra_include_paths=[str(src)], build_directory=str(build_dir),
            with_cuda=with_cuda, is_python_module=False, verbose=False,
        )
    except Exception as exc:
        why = f"{type(exc).__name__}: {_first_error_line(str(exc))}"
        try:
            failed_marker.write_text(why + "\n")
        except OSError:
            pass
        return False, f"JIT build failed in {build_dir}: {why}", True
    return True, f"JIT-built in {build_dir}", False


def _first_error_line(text: str) -> str:
    """The compiler's first error line out of a build log, else the log's start."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    for line in lines:
        if "error:" in line or "error :" in line:  # gcc/clang/nvcc diagnostics
            return line[:300]
    return " ".join(lines)[:300]


def _ops_registered() -> bool:
    try:
        torch.ops.fastweight.agg_ext_info
    except (AttributeError, RuntimeError):
        return False
    return True


def _load() -> tuple[bool, str]:
    global _state, _cuda_kernels
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        src = source_dir()
        warn = False
        if _ops_registered():  # e.g. `import fastweight._C` by hand: loading again would clash
            ok, why = True, "extension already loaded in this process"
        else:
            ok, why = _try_prebuilt(src)
        if not ok:
            ok, why, warn = _try_jit(src, why)
        if ok:
            info = str(torch.ops.fastweight.agg_ext_info())
            _cuda_kernels = "cuda" in info.split()[0]
            _register_python_parts()
            why += " (CPU+CUDA kernels)" if _cuda_kernels else " (CPU kernels)"
        elif warn:
            warnings.warn(f"fastweight: C++ aggregation extension unavailable, using PyTorch: {why}",
                          RuntimeWarning, stacklevel=3)
        _state = (ok, why)
        return _state


def available(device: torch.device | str | None = None) -> bool:
    """Whether the extension loaded (builds it on first call if needed); with ``device``,
    whether it has native kernels for that device type."""
    ok = _load()[0]
    if not ok or device is None:
        return ok
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and _cuda_kernels)


def status(device: torch.device | str | None = None) -> str:
    """One line: why the extension is or is not available (for ``python -m fastweight info``)."""
    ok, why = _load()
    if ok and device is not None and not available(device):
        return f"{why}; no {torch.device(device).type} kernels, those tensors use the PyTorch composition"
    return why


def _require() -> None:
    ok, why = _load()
    if not ok:
        raise RuntimeError(f"fastweight C++ aggregation extension unavailable: {why}")


# ---------------------------------------------------------------- the contract

def coefficients(valid: Tensor, cu_seqlens: Tensor, sample_weights: Tensor | None,
                 token_weights: Tensor | None, per_sample_mean: bool) -> tuple[Tensor, Tensor]:
    """(c (N,) fp32, counts (B,) int64); see :func:`fastweight.aggregation_torch.coefficients`."""
    _require()
    c, counts = torch.ops.fastweight.agg_coefficients(valid, cu_seqlens, sample_weights, token_weights,
                                                      bool(per_sample_mean))
    return c, counts


def segment_mean(values: Tensor, cu_seqlens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(means (B,) fp32, fp64 for fp64 values; counts (B,) int64); differentiable in ``values``."""
    _require()
    means, counts = torch.ops.fastweight.agg_segment_mean(values, cu_seqlens, valid)
    return means, counts


def segment_mean_backward(grad_means: Tensor, cu_seqlens: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
    """(N,) fp32 (fp64 for fp64 grad_means): grad_means[s(t)] / max(n_s(t), 1) on valid tokens, else 0."""
    _require()
    return torch.ops.fastweight.agg_segment_mean_backward(grad_means, cu_seqlens, counts, valid)


# ---------------------------------------------------------------- fake kernels and autograd

def _fake_coefficients(valid, cu_seqlens, sample_weights, token_weights, per_sample_mean):
    b = cu_seqlens.shape[0] - 1
    return valid.new_empty(valid.shape, dtype=torch.float32), cu_seqlens.new_empty((b,), dtype=torch.int64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """segment_mean and its backward return fp64 for fp64 inputs, else fp32 (as the reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_segment_mean(values, cu_seqlens, valid):
    b = cu_seqlens.shape[0] - 1
    return values.new_empty((b,), dtype=_acc(values.dtype)), cu_seqlens.new_empty((b,), dtype=torch.int64)


def _fake_segment_mean_backward(grad_means, cu_seqlens, counts, valid):
    return valid.new_empty(valid.shape, dtype=_acc(grad_means.dtype))


def _coefficients_setup(ctx, inputs, output):
    pass


def _coefficients_backward(ctx, grad_c, grad_counts):
    # The weights are constants (DESIGN.md): no gradient flows to any input.
    return None, None, None, None, None


def _segment_mean_setup(ctx, inputs, output):
    values, cu_seqlens, valid = inputs
    _, counts = output
    ctx.save_for_backward(cu_seqlens, counts, valid)
    ctx.values_dtype = values.dtype


def _segment_mean_grad(ctx, grad_means, grad_counts):
    if grad_means is None or not ctx.needs_input_grad[0]:
        return None, None, None
    cu_seqlens, counts, valid = ctx.saved_tensors
    g = torch.ops.fastweight.agg_segment_mean_backward(grad_means, cu_seqlens, counts, valid)
    return g.to(ctx.values_dtype), None, None


def _backward_setup(ctx, inputs, output):
    grad_means, cu_seqlens, counts, valid = inputs
    ctx.save_for_backward(cu_seqlens, valid)
    ctx.grad_dtype = grad_means.dtype


def _backward_grad(ctx, grad_out):
    # segment_mean_backward is linear in grad_means; its adjoint is the segment mean.
    if grad_out is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    cu_seqlens, valid = ctx.saved_tensors
    means, _ = torch.ops.fastweight.agg_segment_mean(grad_out, cu_seqlens, valid)
    return means.to(ctx.grad_dtype), None, None, None


def _torch_fallback_impls() -> None:
    """CUDA kernels of a CPU-only build: the PyTorch composition, so the ops never fail."""
    from fastweight import aggregation_torch as ref

    lib = torch.library.Library("fastweight", "IMPL")  # noqa: kept alive below
    lib.impl("agg_coefficients", ref.coefficients, "CUDA")
    lib.impl("agg_segment_mean", lambda v, cu, valid: ref.segment_mean(v, cu, valid), "CUDA")
    lib.impl("agg_segment_mean_backward", ref.segment_mean_backward, "CUDA")
    _LIBS.append(lib)


_LIBS: list = []


def _register_python_parts() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    torch.library.register_fake("fastweight::agg_coefficients")(_fake_coefficients)
    torch.library.register_fake("fastweight::agg_segment_mean")(_fake_segment_mean)
    torch.library.register_fake("fastweight::agg_segment_mean_backward")(_fake_segment_mean_backward)
    torch.library.register_autograd("fastweight::agg_coefficients", _coefficients_backward,
                                    setup_context=_coefficients_setup)
    torch.library.register_autograd("fastweight::agg_segment_mean", _segment_mean_grad,
                                    setup_context=_segment_mean_setup)
    torch.library.register_autograd("fastweight::agg_segment_mean_backward", _backward_grad,
                                    setup_context=_backward_setup)
    if torch.version.cuda is not None and not _cuda_kernels:
        _torch_fallback_impls()
