"""Backend choice for the linear cross-entropy and the loss-aggregation ops.

impl="auto" picks Triton for CUDA tensors when Triton imports, else the chunked PyTorch path;
``FASTWEIGHT_IMPL`` overrides "auto". The aggregation ops choose among Triton, the
``fastweight._C`` extension and PyTorch; ``FASTWEIGHT_AGG_IMPL`` overrides their "auto".
An explicit choice that cannot run raises: no silent fallback changes a result.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

LINEAR_CE_IMPLS = ("auto", "triton", "torch", "reference")
AGG_IMPLS = ("auto", "ext", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(usable, reason) for the Triton kernels."""
    try:
        importlib.import_module("fastweight.kernels.linear_ce")
    except Exception as exc:  # ImportError, or triton failing to find a backend
        return False, f"triton unavailable ({type(exc).__name__}: {exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton importable (TRITON_INTERPRET=1: interpreter, for tests only)"
    return True, "triton importable"


def _env_choice(var: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(var, "auto").strip().lower() or "auto"
    if value not in allowed:
        raise ValueError(f"{var}={value!r} is not one of {allowed}")
    return value


def resolve_linear_ce(impl: str, device: torch.device) -> tuple[str, str]:
    """The linear-CE implementation to run, and why."""
    if impl not in LINEAR_CE_IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {LINEAR_CE_IMPLS}")
    if impl != "auto":
        return impl, "requested"
    env = _env_choice("FASTWEIGHT_IMPL", LINEAR_CE_IMPLS)
    if env != "auto":
        return env, "FASTWEIGHT_IMPL"
    if device.type == "cuda":
        ok, why = triton_status()
        if ok:
            return "triton", f"CUDA tensors, {why}"
        return "torch", f"CUDA tensors, {why}"
    return "torch", f"{device.type} tensors: chunked PyTorch"


def linear_ce_module(name: str) -> ModuleType:
    """The backend module implementing the linear-CE contract of ``linear_ce_torch``."""
    if name == "torch":
        from fastweight import linear_ce_torch

        return linear_ce_torch
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"impl='triton' requested but {why}")
        return importlib.import_module("fastweight.kernels.linear_ce")
    raise ValueError(f"no linear-CE backend module named {name!r}")


def resolve_aggregation(device: torch.device) -> tuple[str, str]:
    """The aggregation backend to run on ``device``, and why."""
    env = _env_choice("FASTWEIGHT_AGG_IMPL", AGG_IMPLS)
    if env != "auto":
        return env, "FASTWEIGHT_AGG_IMPL"
    if device.type == "cuda" and triton_status()[0]:
        return "triton", "CUDA tensors, triton importable"
    try:
        from fastweight import aggregation_ext
    except ImportError as exc:
        return "torch", f"extension loader missing ({exc})"
    if aggregation_ext.available(device):
        return "ext", aggregation_ext.status(device)
    return "torch", aggregation_ext.status(device)


def aggregation_module(name: str) -> ModuleType:
    """The backend module implementing the aggregation contract of ``aggregation_torch``."""
    if name == "torch":
        from fastweight import aggregation_torch

        return aggregation_torch
    if name == "ext":
        from fastweight import aggregation_ext

        if not aggregation_ext.available():
            raise RuntimeError(f"FASTWEIGHT_AGG_IMPL=ext but {aggregation_ext.status()}")
        return aggregation_ext
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"aggregation backend 'triton' requested but {why}")
        return importlib.import_module("fastweight.kernels.aggregation")
    raise ValueError(f"no aggregation backend named {name!r}")
