"""The aggregation backend of the C++/CUDA extension: ``torch.ops.fastweight.agg_*``.

Same contract as :mod:`fastweight.aggregation.reference`. The kernels are in ``csrc/``; they are
called only from inside fastweight's own custom ops, so they need no fake or autograd kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastweight.extension import load


def _ops():
    status = load()
    if not status.available:
        raise RuntimeError(f"fastweight C++ aggregation extension unavailable: {status.reason}")
    return torch.ops.fastweight


def coefficients(valid: Tensor, cu_seqlens: Tensor, sample_weights: Tensor | None,
                 token_weights: Tensor | None, per_sample_mean: bool,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(c (N,) fp32, counts (B,) int64); only ``dtype=torch.float32`` (the registry knows)."""
    if dtype != torch.float32:
        raise ValueError(f"the C++ aggregation backend computes fp32 coefficients, not {dtype}")
    return _ops().agg_coefficients(valid, cu_seqlens, sample_weights, token_weights, bool(per_sample_mean))


def segment_mean(values: Tensor, cu_seqlens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(means (B,) fp32, fp64 for fp64 values; counts (B,) int64)."""
    return _ops().agg_segment_mean(values, cu_seqlens, valid)


def segment_mean_backward(grad_means: Tensor, cu_seqlens: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
    """(N,) fp32 (fp64 for fp64 grad_means): grad_means[s(t)] / max(n_s(t), 1) on valid tokens."""
    return _ops().agg_segment_mean_backward(grad_means, cu_seqlens, counts, valid)
