"""The linear cross-entropy as ``torch.library`` custom ops, so it works under torch.compile.

Two differentiable ops share the backends' one gradient routine:

- ``linear_ce_reduced``: sum_t c_t * l_t for coefficients known in the forward (mean, sum). The
  backend forms the gradients in the same pass; the backward only scales them by the upstream
  scalar. It scales in place, so a second backward through the same graph raises, unless inside
  ``retain_graph_safe()`` (or under torch.compile), which costs one more gradient-sized copy.
- ``linear_ce_tokens``: per-token losses. Its backward reruns the gradient routine with the
  upstream gradient as the coefficients (none, sequence).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

from fastweight import dispatch


_state = threading.local()


@contextlib.contextmanager
def retain_graph_safe() -> Iterator[None]:
    """Within this context, mean/sum losses keep their precomputed gradients intact, so
    ``backward(retain_graph=True)`` twice, ``gradcheck`` and double calls work."""
    previous = getattr(_state, "retain", False)
    _state.retain = True
    try:
        yield
    finally:
        _state.retain = previous


def _kwargs(softcap: float, label_smoothing: float, chunk_bytes: int) -> dict:
    return dict(softcap=softcap or None, label_smoothing=label_smoothing,
                chunk_bytes=chunk_bytes or None)


def _empty_bias_grad(x: Tensor) -> Tensor:
    return x.new_empty(0)


@torch.library.custom_op("fastweight::linear_ce_reduced", mutates_args=())
def linear_ce_reduced(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, coeff: Tensor,
                      softcap: float, label_smoothing: float, impl: str, chunk_bytes: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss scalar, dx, dw, db) for loss = sum_t coeff_t * l_t; db is empty without bias."""
    backend = dispatch.linear_ce_module(impl)
    loss, dx, dw, db = backend.forward_backward(x, weight, bias, targets, coeff,
                                                **_kwargs(softcap, label_smoothing, chunk_bytes))
    total = torch.dot(loss, coeff.to(loss.dtype))
    return total, dx, dw, db if db is not None else _empty_bias_grad(x)


@linear_ce_reduced.register_fake
def _(x, weight, bias, targets, coeff, softcap, label_smoothing, impl, chunk_bytes):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    db = torch.empty_like(bias) if bias is not None else _empty_bias_grad(x)
    return x.new_empty((), dtype=acc), torch.empty_like(x), torch.empty_like(weight), db


def _reduced_setup(ctx, inputs, output):
    _, dx, dw, db = output
    ctx.grads = (dx, dw, db if inputs[2] is not None else None)
    ctx.retain = getattr(_state, "retain", False)
    ctx.mark_non_differentiable(dx, dw, db)
    # The gradient outputs get no upstream gradient: don't let autograd zero-fill one per
    # output (a dW-sized temporary) just to ignore it.
    ctx.set_materialize_grads(False)


def _reduced_backward(ctx, g, *_):
    if g is None:  # the loss itself received no gradient (materialisation is off)
        return (None,) * 9
    if ctx.grads is None:
        raise RuntimeError("fastweight.weighted_ce (reduction mean/sum) scales its precomputed "
                           "gradients in place: backward through the same graph twice is not "
                           "supported; recompute the loss, or build it inside "
                           "fastweight.ops.retain_graph_safe()")
    dx, dw, db = ctx.grads
    if ctx.retain or torch.compiler.is_compiling():
        scaled = [None if t is None else t * g.to(t.dtype) for t in (dx, dw, db)]
    else:
        ctx.grads = None
        scaled = [None if t is None else t.mul_(g.to(t.dtype)) for t in (dx, dw, db)]
    return scaled[0], scaled[1], scaled[2], None, None, None, None, None, None


linear_ce_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup)


@torch.library.custom_op("fastweight::linear_ce_tokens", mutates_args=())
def linear_ce_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     softcap: float, label_smoothing: float, impl: str, chunk_bytes: int
                     ) -> tuple[Tensor, Tensor]:
    """Per-token (loss, lse), (N,) each."""
    backend = dispatch.linear_ce_module(impl)
    return backend.forward(x, weight, bias, targets, **_kwargs(softcap, label_smoothing, chunk_bytes))


@linear_ce_tokens.register_fake
def _(x, weight, bias, targets, softcap, label_smoothing, impl, chunk_bytes):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[0]
    return x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc)


@torch.library.custom_op("fastweight::linear_ce_grad", mutates_args=())
def linear_ce_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, coeff: Tensor,
                   lse: Tensor, softcap: float, label_smoothing: float, impl: str, chunk_bytes: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dw, db) of sum_t coeff_t * l_t; db is empty without bias."""
    backend = dispatch.linear_ce_module(impl)
    dx, dw, db = backend.backward(x, weight, bias, targets, coeff, lse,
                                  **_kwargs(softcap, label_smoothing, chunk_bytes))
    return dx, dw, db if db is not None else _empty_bias_grad(x)


@linear_ce_grad.register_fake
def _(x, weight, bias, targets, coeff, lse, softcap, label_smoothing, impl, chunk_bytes):
    db = torch.empty_like(bias) if bias is not None else _empty_bias_grad(x)
    return torch.empty_like(x), torch.empty_like(weight), db


def _tokens_setup(ctx, inputs, output):
    x, weight, bias, targets, softcap, label_smoothing, impl, chunk_bytes = inputs
    ctx.save_for_backward(x, weight, bias, targets, output[1])
    ctx.options = (softcap, label_smoothing, impl, chunk_bytes)
    ctx.mark_non_differentiable(output[1])


def _tokens_backward(ctx, grad_loss, _grad_lse):
    x, weight, bias, targets, lse = ctx.saved_tensors
    # A stride-0 upstream (from .sum()) or a non-contiguous one is made dense here.
    coeff = torch.where(targets >= 0, grad_loss, 0).to(torch.float32 if x.dtype != torch.float64 else x.dtype).contiguous()
    dx, dw, db = linear_ce_grad(x, weight, bias, targets, coeff, lse, *ctx.options)
    return dx, dw, db if bias is not None else None, None, None, None, None, None


linear_ce_tokens.register_autograd(_tokens_backward, setup_context=_tokens_setup)
