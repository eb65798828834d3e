"""Shared test set-up: the Triton interpreter on CPU-only machines, the `gpu` marker, and the
tolerance rule of DESIGN.md."""
from __future__ import annotations

import os

import pytest

# Must happen before anything imports triton (the kernels read it at import time).
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    from fastweight.testing import patch_triton_interpreter

    patch_triton_interpreter()


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_to_ref(fast: torch.Tensor, ref64: torch.Tensor, naive: torch.Tensor | None = None,
                        atol: float | None = None, rel_norm: float | None = None, name: str = "") -> None:
    """DESIGN.md's rule: elementwise |fast - ref64| <= 2 * |naive - ref64| + atol, where naive is
    the reference run in the input's own dtype, plus a relative-norm check.

    Without ``naive`` the bound is atol alone. An output stored in a 16-bit dtype may also be
    off by the rounding to that dtype (one eps relative), which the naive run need not share
    element by element. NaN anywhere in ``fast`` fails.
    """
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    fast64 = fast.detach().to(torch.float64)
    ref = ref64.detach().to(torch.float64)
    assert torch.isfinite(fast64).all(), f"{name}: non-finite values (unwritten output?)"
    if atol is None:
        atol = ATOL.get(fast.dtype, 1e-5)
    bound = torch.full_like(ref, atol)
    if fast.dtype in (torch.float16, torch.bfloat16):
        bound = bound + torch.finfo(fast.dtype).eps * ref.abs()
    if naive is not None:
        bound = bound + 2 * (naive.detach().to(torch.float64) - ref).abs()
    err = (fast64 - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{err.numel()} elements out of tolerance, "
                           f"worst err {err.max().item():.3e} vs bound {bound[bad].min().item():.3e}")
    # Relative-norm check: no worse than twice the naive run's, plus a small floor.
    denom = ref.norm().clamp_min(1e-12)
    rel = ((fast64 - ref).norm() / denom).item()
    limit = 1e-5 if rel_norm is None else rel_norm
    if naive is not None:
        limit += 2 * ((naive.detach().to(torch.float64) - ref).norm() / denom).item()
    assert rel <= limit or (fast64 - ref).norm().item() <= atol * max(1, ref.numel()) ** 0.5, (
        f"{name}: relative norm error {rel:.3e} > {limit:.1e}")
