"""Loss aggregation: per-token coefficients from sample and token weights, and per-sequence
means. Public helpers for packed batches; ``weighted_ce`` uses them too.

The work is done by one of three backends with the same contract (``aggregation_torch``):
the ``fastweight._C`` extension, Triton, or PyTorch, chosen by ``dispatch.resolve_aggregation``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastweight import _layout, _validate, dispatch

SAMPLE_REDUCTIONS = ("token", "mean")


def backend(device: torch.device, dtype: torch.dtype = torch.float32):
    """The aggregation backend module for tensors on ``device``. fp64 values always take the
    PyTorch backend, the only one that keeps fp64 (the others work in fp32)."""
    if dtype == torch.float64:
        return dispatch.aggregation_module("torch")
    name, _ = dispatch.resolve_aggregation(device)
    return dispatch.aggregation_module(name)


def normalised_coefficients(valid: Tensor, cu_seqlens: Tensor, sample_weights: Tensor | None,
                            token_weights: Tensor | None, sample_reduction: str, reduction: str,
                            num_items, dtype: torch.dtype = torch.float32) -> Tensor:
    """c (N,) fp32 such that sum_t c_t * l_t is the requested scalar reduction (DESIGN.md).
    ``dtype=torch.float64`` keeps fp64 (PyTorch backend), for fp64 ground-truth runs."""
    per_sample_mean = sample_reduction == "mean"
    if dtype == torch.float64:
        c, counts = dispatch.aggregation_module("torch").coefficients(
            valid, cu_seqlens, sample_weights, token_weights, per_sample_mean, dtype=dtype)
    else:
        c, counts = backend(valid.device).coefficients(
            valid, cu_seqlens, sample_weights, token_weights, per_sample_mean)
    if reduction == "sum":
        return c
    if num_items is not None:
        denom = torch.as_tensor(num_items, device=c.device).to(c.dtype)
    elif per_sample_mean:
        denom = (counts > 0).sum().to(c.dtype)
    else:
        denom = counts.sum().to(c.dtype)
    # An all-ignored batch has c = 0 everywhere: dividing by 1 keeps it a finite zero.
    return c / denom.clamp_min(1.0)


def token_coefficients(labels: Tensor, sample_weights: Tensor | None = None, *,
                       token_weights: Tensor | None = None, cu_seqlens: Tensor | None = None,
                       shift: bool = False, ignore_index: int = -100,
                       sample_reduction: str = "token", reduction: str = "mean",
                       num_items=None) -> Tensor:
    """Per-token coefficients c, (N,) fp32 with N = labels.numel(), such that
    ``weighted_ce(..., reduction=reduction) == sum_t c_t * l_t``.

    labels: (B, T) rows, or (N,) packed with ``cu_seqlens`` (B+1,); sample_weights (B,);
    token_weights shaped like labels. With ``shift``, c is indexed by input position (position t
    carries label t+1's coefficient). Constants: no gradient flows to the weights.
    """
    _validate.int_tensor("labels", labels)
    _validate.choice("sample_reduction", sample_reduction, SAMPLE_REDUCTIONS)
    _validate.choice("reduction", reduction, ("mean", "sum"))
    # A zero-width stand-in for hidden lets the shared layout code resolve rows and packing.
    ghost = labels.new_empty(*labels.shape, 0, dtype=torch.float32)
    flat = _layout.flatten(ghost, labels, cu_seqlens, token_weights, shift, ignore_index)
    return normalised_coefficients(flat.valid, flat.cu_seqlens,
                                   None if sample_weights is None else sample_weights.detach(),
                                   None if flat.token_weights is None else flat.token_weights.detach(),
                                   sample_reduction, reduction, num_items)


@torch.library.custom_op("fastweight::segment_mean", mutates_args=())
def _segment_mean_op(values: Tensor, cu_seqlens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    means, counts = backend(values.device, values.dtype).segment_mean(values, cu_seqlens, valid)
    return means, counts


@_segment_mean_op.register_fake
def _(values, cu_seqlens, valid):
    b = cu_seqlens.shape[0] - 1
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    return values.new_empty(b, dtype=acc), values.new_empty(b, dtype=torch.int64)


def _segment_mean_setup(ctx, inputs, output):
    _, cu_seqlens, valid = inputs
    ctx.save_for_backward(cu_seqlens, output[1], valid)
    ctx.values_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(output[1])


def _segment_mean_backward(ctx, grad_means, _grad_counts):
    cu_seqlens, counts, valid = ctx.saved_tensors
    g = backend(grad_means.device, grad_means.dtype).segment_mean_backward(grad_means.contiguous(), cu_seqlens, counts, valid)
    return g.to(ctx.values_dtype), None, None


_segment_mean_op.register_autograd(_segment_mean_backward, setup_context=_segment_mean_setup)


def segment_mean(values: Tensor, cu_seqlens: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean of ``values`` (N,) over each segment's valid tokens: (B,) fp32 (fp64 for fp64
    values), 0 for a segment
    with none. Differentiable with respect to ``values``.

    cu_seqlens: (B+1,) integer, non-decreasing from 0 to N; valid: (N,) bool or None (all).
    """
    _validate.float_tensor("values", values)
    _validate.int_tensor("cu_seqlens", cu_seqlens)
    if values.dim() != 1:
        raise ValueError(f"`values` must be 1-D (N,), got shape {tuple(values.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"`cu_seqlens` must be 1-D with B+1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    elif valid.dtype != torch.bool or valid.shape != values.shape:
        raise TypeError(f"`valid` must be a bool tensor shaped like values {tuple(values.shape)}, "
                        f"got {valid.dtype} {tuple(valid.shape)}")
    cu = cu_seqlens.to(device=values.device, dtype=torch.int64)
    _validate.check_values(cu.new_empty(0), 0, 0, cu, values.numel(), {})
    return segment_mean_unchecked(values, cu, valid)


def segment_mean_unchecked(values: Tensor, cu_seqlens: Tensor, valid: Tensor) -> Tensor:
    """``segment_mean`` on arguments already validated and flattened (int64 cu_seqlens)."""
    return _segment_mean_op(values, cu_seqlens, valid)[0]
