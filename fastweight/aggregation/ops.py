"""The loss-aggregation ops as ``torch.library`` custom ops.

Each op resolves its backend (C++/CUDA extension, Triton, or PyTorch: :mod:`fastweight.backends`)
inside its eager body, so torch.compile traces only the fake kernels below and the choice
never enters a graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastweight import backends


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend(device: torch.device, dtype: torch.dtype):
    return backends.module("aggregation", "auto", device, _accumulation(dtype))


@torch.library.custom_op("fastweight::coefficients", mutates_args=())
def coefficients(valid: Tensor, cu_seqlens: Tensor, sample_weights: Optional[Tensor],
                 token_weights: Optional[Tensor], per_sample_mean: bool, fp64: bool) -> tuple[Tensor, Tensor]:
    """(c (N,) fp32, or fp64 with ``fp64``; counts (B,) int64): c_t = valid_t * w[s(t)] * u_t,
    divided by n_s(t) when ``per_sample_mean``. Constants: no gradient flows to the weights."""
    dtype = torch.float64 if fp64 else torch.float32
    return _backend(valid.device, dtype).coefficients(valid, cu_seqlens, sample_weights, token_weights,
                                                      per_sample_mean, dtype)


@coefficients.register_fake
def _(valid, cu_seqlens, sample_weights, token_weights, per_sample_mean, fp64):
    num_segments = cu_seqlens.shape[0] - 1
    return (valid.new_empty(valid.shape, dtype=torch.float64 if fp64 else torch.float32),
            cu_seqlens.new_empty((num_segments,), dtype=torch.int64))


@torch.library.custom_op("fastweight::segment_mean", mutates_args=())
def segment_mean(values: Tensor, cu_seqlens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(means (B,) fp32, fp64 for fp64 values; counts (B,) int64): the mean of the valid values
    of each segment, 0 for a segment with none. Differentiable in ``values``."""
    return _backend(values.device, values.dtype).segment_mean(values, cu_seqlens, valid)


@segment_mean.register_fake
def _(values, cu_seqlens, valid):
    num_segments = cu_seqlens.shape[0] - 1
    return (values.new_empty((num_segments,), dtype=_accumulation(values.dtype)),
            cu_seqlens.new_empty((num_segments,), dtype=torch.int64))


@torch.library.custom_op("fastweight::segment_mean_backward", mutates_args=())
def segment_mean_backward(grad_means: Tensor, cu_seqlens: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
    """(N,): grad_means[s(t)] / max(n_s(t), 1) on valid tokens, 0 elsewhere; fp32 (fp64 for fp64)."""
    return _backend(grad_means.device, grad_means.dtype).segment_mean_backward(
        grad_means.contiguous(), cu_seqlens, counts, valid)


@segment_mean_backward.register_fake
def _(grad_means, cu_seqlens, counts, valid):
    return valid.new_empty(valid.shape, dtype=_accumulation(grad_means.dtype))


def _segment_mean_setup(ctx, inputs, output):
    values, cu_seqlens, valid = inputs
    ctx.save_for_backward(cu_seqlens, output[1], valid)
    ctx.values_dtype = values.dtype
    ctx.mark_non_differentiable(output[1])


def _segment_mean_grad(ctx, grad_means, _grad_counts):
    cu_seqlens, counts, valid = ctx.saved_tensors
    return segment_mean_backward(grad_means, cu_seqlens, counts, valid).to(ctx.values_dtype), None, None


def _backward_setup(ctx, inputs, output):
    grad_means, cu_seqlens, _counts, valid = inputs
    ctx.save_for_backward(cu_seqlens, valid)
    ctx.grad_dtype = grad_means.dtype


def _backward_grad(ctx, grad_values):
    # segment_mean_backward is linear in grad_means; its adjoint is the segment mean.
    cu_seqlens, valid = ctx.saved_tensors
    means, _ = segment_mean(grad_values, cu_seqlens, valid)
    return means.to(ctx.grad_dtype), None, None, None


segment_mean.register_autograd(_segment_mean_grad, setup_context=_segment_mean_setup)
segment_mean_backward.register_autograd(_backward_grad, setup_context=_backward_setup)


def normalised_coefficients(valid: Tensor, cu_seqlens: Tensor, sample_weights: Tensor | None,
                            token_weights: Tensor | None, sample_reduction: str, reduction: str,
                            num_items, dtype: torch.dtype = torch.float32) -> Tensor:
    """c (N,) such that sum_t c_t * l_t is the requested scalar reduction (DESIGN.md); fp32, or
    fp64 for ``dtype=torch.float64`` (fp64 ground-truth runs).

    ``num_items`` divides exactly, whatever its value (validated by the caller when the value
    checks are on): 0 gives inf/NaN, never a silent clamp. Without it, an all-ignored batch
    divides c = 0 by 1 and stays a finite zero."""
    per_sample_mean = sample_reduction == "mean"
    c, counts = coefficients(valid, cu_seqlens, sample_weights, token_weights, per_sample_mean,
                             dtype == torch.float64)
    if reduction == "sum":
        return c
    if num_items is not None:
        return c / torch.as_tensor(num_items, device=c.device).to(c.dtype)
    denom = (counts > 0).sum() if per_sample_mean else counts.sum()
    return c / denom.to(c.dtype).clamp_min(1.0)
