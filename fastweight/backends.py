"""The backend registry: every implementation of every op, what it supports, and the one
resolver that picks among them.

Each backend declares its devices and dtypes. :func:`resolve` owns all routing: the user's
``impl``, the environment overrides (``FASTWEIGHT_IMPL``, ``FASTWEIGHT_AGG_IMPL``), fp64, and
"auto"'s order of preference. An explicit choice that cannot run raises: no silent fallback
changes a result. ``python -m fastweight info`` prints the decisions.

Resolution runs inside the custom ops' eager bodies, never in code that torch.compile traces.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from fastweight import env
from fastweight.aggregation import extension as aggregation_extension
from fastweight.aggregation import reference as aggregation_reference
from fastweight.extension import load as load_extension
from fastweight.linear_ce import chunked as linear_ce_chunked
from fastweight.linear_ce import reference as linear_ce_reference

try:  # Triton is optional; a missing or broken install only removes these backends.
    from fastweight.kernels import aggregation as aggregation_triton
    from fastweight.kernels import linear_ce as linear_ce_triton
    TRITON_ERROR: str | None = None
except Exception as exc:  # ImportError, or a Triton that finds no backend
    aggregation_triton = linear_ce_triton = None
    TRITON_ERROR = f"triton unavailable ({type(exc).__name__}: {exc})"

FLOAT16 = frozenset({torch.float16, torch.bfloat16, torch.float32})
ALL_FLOATS = FLOAT16 | {torch.float64}


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``dtypes`` are the input dtypes (linear CE) or accumulation dtypes (aggregation) it runs in.
    ``probe`` says whether it can run here and which devices it then covers, with a reason.
    ``auto_devices`` are the device types where "auto" may pick it (the registry's order is
    "auto"'s preference).
    """
    op: str
    name: str
    module: ModuleType | None
    dtypes: frozenset[torch.dtype]
    probe: Callable[[], tuple[frozenset[str], str]]
    auto_devices: frozenset[str]


def _triton_devices() -> tuple[frozenset[str], str]:
    if TRITON_ERROR is not None:
        return frozenset(), TRITON_ERROR
    if os.environ.get("TRITON_INTERPRET") == "1":
        return frozenset({"cuda", "cpu"}), "triton (TRITON_INTERPRET=1: the CPU interpreter, for tests only)"
    return frozenset({"cuda"}), "triton importable"


def _extension_devices() -> tuple[frozenset[str], str]:
    status = load_extension()
    return status.devices, status.reason


def _everywhere(reason: str) -> Callable[[], tuple[frozenset[str], str]]:
    return lambda: (frozenset({"cpu", "cuda", "mps", "xpu"}), reason)


ANY_DEVICE = frozenset({"cpu", "cuda", "mps", "xpu"})
GPU = frozenset({"cuda"})
FP32 = frozenset({torch.float32})

# Order = preference of "auto". The interpreter makes Triton run on the CPU, but only on request.
# The reference linear CE materialises the logits: never "auto". Aggregation on CUDA: the C++
# kernels measured faster than the Triton ones on an H200 (0.068 vs 0.104 ms for 1M tokens,
# ../shared/gpu), so they come first.
REGISTRY: dict[str, tuple[Backend, ...]] = {
    "linear_ce": (
        Backend("linear_ce", "triton", linear_ce_triton, FLOAT16, _triton_devices, GPU),
        Backend("linear_ce", "torch", linear_ce_chunked, ALL_FLOATS, _everywhere("chunked PyTorch"), ANY_DEVICE),
        Backend("linear_ce", "reference", linear_ce_reference, ALL_FLOATS,
                _everywhere("materialised logits: the ground truth, only on request"), frozenset()),
    ),
    "aggregation": (
        Backend("aggregation", "ext", aggregation_extension, FP32, _extension_devices, ANY_DEVICE),
        Backend("aggregation", "triton", aggregation_triton, FP32, _triton_devices, GPU),
        Backend("aggregation", "torch", aggregation_reference, ALL_FLOATS, _everywhere("PyTorch composition"),
                ANY_DEVICE),
    ),
}
ENV_OVERRIDE = {"linear_ce": "FASTWEIGHT_IMPL", "aggregation": "FASTWEIGHT_AGG_IMPL"}


def names(op: str) -> tuple[str, ...]:
    """The valid ``impl`` values of ``op``: "auto" and every backend's name."""
    return ("auto",) + tuple(b.name for b in REGISTRY[op])


def _by_name(op: str, name: str) -> Backend:
    for backend in REGISTRY[op]:
        if backend.name == name:
            return backend
    raise ValueError(f"no {op} backend named {name!r}; choose one of {names(op)}")


def _unsupported(backend: Backend, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run on (device, dtype), or None if it can. The dtype is checked
    first: probing the extension may build it, which an fp64 run never needs."""
    if dtype not in backend.dtypes:
        return f"it does not support {dtype}"
    devices, reason = backend.probe()
    if backend.module is None or device.type not in devices:
        return f"it does not run on {device.type} here ({reason})"
    return None


def resolve(op: str, impl: str, device: torch.device, dtype: torch.dtype) -> tuple[Backend, str]:
    """The backend of ``op`` to run for tensors on ``device`` of ``dtype``, and why.

    ``impl`` is "auto" or a backend name; with "auto" the op's environment variable may name
    one. A named backend that cannot run raises RuntimeError.
    """
    if impl not in names(op):
        raise ValueError(f"impl={impl!r} is not one of {names(op)}")
    source = "requested"
    if impl == "auto":
        override = env.get(ENV_OVERRIDE[op], "auto").lower()
        if override not in names(op):
            raise ValueError(f"{ENV_OVERRIDE[op]}={override!r} is not one of {names(op)}")
        impl, source = override, ENV_OVERRIDE[op]
    if impl != "auto":
        backend = _by_name(op, impl)
        problem = _unsupported(backend, device, dtype)
        if problem:
            raise RuntimeError(f"{op} backend {impl!r} ({source}) cannot run: {problem}")
        return backend, source
    skipped = []
    for backend in REGISTRY[op]:
        if device.type not in backend.auto_devices:
            continue
        problem = _unsupported(backend, device, dtype)
        if problem is None:
            return backend, "auto" + (f" (not {'; not '.join(skipped)})" if skipped else "")
        skipped.append(f"{backend.name}: {problem}")
    raise RuntimeError(f"no {op} backend runs on {device.type} with {dtype}: {'; '.join(skipped)}")


def module(op: str, impl: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The module implementing ``op``'s contract that :func:`resolve` picks."""
    return resolve(op, impl, device, dtype)[0].module
