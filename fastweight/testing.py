"""Test-only helpers. Production code never imports this module.

- :func:`poison_buffers`: NaN-fill (or -7-fill) every buffer the Triton launchers allocate, so
  an element a kernel forgets to write fails a test instead of passing by luck.
- :func:`patch_triton_interpreter`: make Triton 3.6's CPU interpreter work with numpy >= 2.4;
  call it only where ``TRITON_INTERPRET=1`` runs (the test suite's conftest does).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _poisoned(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)


@contextlib.contextmanager
def poison_buffers() -> Iterator[None]:
    """Within the context, the Triton launchers' buffers start as NaN (floats) or -7 (ints)."""
    from fastweight.kernels import aggregation, linear_ce

    originals = {module: module.new_buffer for module in (aggregation, linear_ce)}
    try:
        for module in originals:
            module.new_buffer = _poisoned
        yield
    finally:
        for module, original in originals.items():
            module.new_buffer = original


def patch_triton_interpreter() -> None:
    """Make loops with runtime bounds work under TRITON_INTERPRET=1 with numpy >= 2.4.

    Triton 3.6's interpreter turns a scalar into a Python int with ``int(array_of_shape_1)``,
    which numpy 2.4 rejects (triton-lang/triton#9171), so ``range(0, n, BLOCK)`` fails there.
    This wraps the interpreter's tensor patching to convert via ``reshape(-1)[0]``. It only
    touches the interpreter module, is idempotent, and does nothing if the layout changed.
    """
    try:
        from triton.runtime import interpreter
    except Exception:  # no interpreter in this Triton
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fastweight_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._fastweight_index_fix = True
    interpreter._patch_lang_tensor = patched
