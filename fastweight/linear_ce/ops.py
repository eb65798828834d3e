"""The linear cross-entropy as ``torch.library`` custom ops, so it works under torch.compile.

Two differentiable ops share the backends' one gradient routine (``linear_ce`` of each backend):

- ``linear_ce_reduced``: sum_t c_t * l_t for coefficients known in the forward (mean, sum). The
  backend forms the gradients in the same pass; the backward only scales them by the upstream
  scalar. It scales in place, so a second backward through the same graph raises, unless inside
  :func:`retain_graph_safe` (or under torch.compile), which costs one more gradient-sized copy.
- ``linear_ce_tokens``: per-token losses. Its backward (``linear_ce_grad``) reruns the gradient
  routine with the upstream gradient as the coefficients (none, sequence).

Every op resolves its backend inside its eager body (:mod:`fastweight.backends`), so that a
torch.compile trace sees only the fake kernels. Only the gradients autograd needs are computed:
the ``grad_*`` flags of ``linear_ce_reduced`` come from the inputs' ``requires_grad``, those of
the backward from ``ctx.needs_input_grad``.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

from fastweight import backends, env

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


def _backend(impl: str, x: Tensor):
    return backends.module("linear_ce", impl, x.device, x.dtype)


def _options(softcap: float, label_smoothing: float, z_loss: float, chunk_bytes: int) -> dict:
    """Backend keyword options. The schema has no None for numbers: 0 stands for "not set".
    The budget is the call's, else ``FASTWEIGHT_CHUNK_BYTES``, else the backend's default."""
    budget = chunk_bytes or None
    if budget is None:
        configured = env.get("FASTWEIGHT_CHUNK_BYTES")
        if configured is not None:
            if not configured.isdigit() or int(configured) <= 0:
                raise ValueError(f"FASTWEIGHT_CHUNK_BYTES={configured!r} is not a positive integer")
            budget = int(configured)
    return dict(softcap=softcap or None, label_smoothing=label_smoothing, z_loss=z_loss, chunk_bytes=budget)


def _accumulation(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _or_empty(t: Tensor | None, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An output not computed comes back as an empty tensor (the schema has no Optional outputs)."""
    return t if t is not None else x.new_empty(0, dtype=dtype)


@torch.library.custom_op("fastweight::linear_ce_reduced", mutates_args=())
def linear_ce_reduced(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, coeff: Tensor,
                      softcap: float, label_smoothing: float, z_loss: float, impl: str, chunk_bytes: int,
                      hits: bool, grad_x: bool, grad_weight: bool, grad_bias: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss scalar, lse (N,), hits (N,) bool, dx, dw, db) for loss = sum_t coeff_t * l_t; hits
    and a gradient not asked for (and db without bias) are empty. With no gradient asked for,
    it runs forward only."""
    backend = _backend(impl, x)
    options = _options(softcap, label_smoothing, z_loss, chunk_bytes)
    needs = (grad_x, grad_weight, grad_bias and bias is not None)
    if any(needs):
        loss, lse, hit, grads = backend.linear_ce(x, weight, bias, targets, coeff, hits=hits, needs=needs, **options)
    else:
        loss, lse, hit, _ = backend.linear_ce(x, weight, bias, targets, hits=hits, **options)
        grads = (None, None, None)
    total = torch.dot(loss, coeff.to(loss.dtype))
    return (total, lse, _or_empty(hit, x, torch.bool)) + tuple(_or_empty(g, x) for g in grads)


@linear_ce_reduced.register_fake
def _(x, weight, bias, targets, coeff, softcap, label_smoothing, z_loss, impl, chunk_bytes, hits, grad_x,
      grad_weight, grad_bias):
    def like(t, wanted):
        return torch.empty_like(t) if t is not None and wanted else x.new_empty(0)
    n = x.shape[0]
    return (x.new_empty((), dtype=_accumulation(x)), x.new_empty(n, dtype=_accumulation(x)),
            x.new_empty(n if hits else 0, dtype=torch.bool),
            like(x, grad_x), like(weight, grad_weight), like(bias, grad_bias))


def _reduced_setup(ctx, inputs, output):
    _, lse, hit, dx, dw, db = output
    ctx.grads = (dx, dw, db)
    ctx.impl = inputs[8]
    ctx.retain = getattr(_state, "retain", False)
    ctx.mark_non_differentiable(lse, hit, dx, dw, db)
    # The gradient outputs get no upstream gradient: don't let autograd zero-fill one per
    # output (a dW-sized temporary) just to ignore it.
    ctx.set_materialize_grads(False)


def _reduced_backward(ctx, upstream, *_):
    if upstream is None:  # the loss itself received no gradient (materialisation is off)
        return (None,) * 14
    if ctx.grads is None:
        raise RuntimeError("fastweight.weighted_ce (reduction mean/sum) scales its precomputed "
                           "gradients in place: backward through the same graph twice is not "
                           "supported; recompute the loss, or build it inside "
                           "fastweight.retain_graph_safe()")
    scale_in_place = not (ctx.retain or torch.compiler.is_compiling())
    backend = _backend(ctx.impl, ctx.grads[0]) if scale_in_place else None  # grads[0]: dx, or empty like x
    scaled = []
    for grad, needed in zip(ctx.grads, ctx.needs_input_grad[:3]):
        if not needed:
            scaled.append(None)
        elif scale_in_place:
            scaled.append(backend.scale_(grad, upstream))
        else:
            scaled.append(grad * upstream.to(grad.dtype))
    if scale_in_place:
        ctx.grads = None
    return (*scaled, *(None,) * 11)


linear_ce_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup)


@torch.library.custom_op("fastweight::linear_ce_tokens", mutates_args=())
def linear_ce_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     softcap: float, label_smoothing: float, z_loss: float, impl: str, chunk_bytes: int,
                     hits: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token (loss, lse, hits), (N,) each: fp32 (fp64 for fp64 inputs), and bool hits
    (empty unless asked for)."""
    loss, lse, hit, _ = _backend(impl, x).linear_ce(
        x, weight, bias, targets, hits=hits, **_options(softcap, label_smoothing, z_loss, chunk_bytes))
    return loss, lse, _or_empty(hit, x, torch.bool)


@linear_ce_tokens.register_fake
def _(x, weight, bias, targets, softcap, label_smoothing, z_loss, impl, chunk_bytes, hits):
    n = x.shape[0]
    return (x.new_empty(n, dtype=_accumulation(x)), x.new_empty(n, dtype=_accumulation(x)),
            x.new_empty(n if hits else 0, dtype=torch.bool))


@torch.library.custom_op("fastweight::linear_ce_grad", mutates_args=())
def linear_ce_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, coeff: Tensor,
                   lse: Tensor, softcap: float, label_smoothing: float, z_loss: float, impl: str, chunk_bytes: int,
                   grad_x: bool, grad_weight: bool, grad_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dw, db) of sum_t coeff_t * l_t, given the forward's ``lse``; a gradient
    not asked for (and db without bias) is empty."""
    _, _, _, grads = _backend(impl, x).linear_ce(
        x, weight, bias, targets, coeff, lse=lse, needs=(grad_x, grad_weight, grad_bias and bias is not None),
        **_options(softcap, label_smoothing, z_loss, chunk_bytes))
    return tuple(_or_empty(g, x) for g in grads)


@linear_ce_grad.register_fake
def _(x, weight, bias, targets, coeff, lse, softcap, label_smoothing, z_loss, impl, chunk_bytes, grad_x,
      grad_weight, grad_bias):
    def like(t, wanted):
        return torch.empty_like(t) if t is not None and wanted else x.new_empty(0)
    return like(x, grad_x), like(weight, grad_weight), like(bias, grad_bias)


def _tokens_setup(ctx, inputs, output):
    x, weight, bias, targets, softcap, label_smoothing, z_loss, impl, chunk_bytes, _hits = inputs
    ctx.save_for_backward(x, weight, bias, targets, output[1])
    ctx.options = (softcap, label_smoothing, z_loss, impl, chunk_bytes)
    ctx.mark_non_differentiable(output[1], output[2])


def _tokens_backward(ctx, grad_loss, _grad_lse, _grad_hits):
    x, weight, bias, targets, lse = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # A stride-0 upstream (from .sum()) or a non-contiguous one is made dense here.
    coeff = grad_loss.to(_accumulation(x)).contiguous()
    dx, dw, db = linear_ce_grad(x, weight, bias, targets, coeff, lse, *ctx.options, need_x, need_w, need_b)
    return (dx if need_x else None, dw if need_w else None, db if need_b else None, *(None,) * 7)


linear_ce_tokens.register_autograd(_tokens_backward, setup_context=_tokens_setup)
