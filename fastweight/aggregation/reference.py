"""Loss-aggregation ops in plain PyTorch: the reference for the Triton and C++/CUDA backends,
and the backend of fp64 runs.

Every aggregation backend (this module, :mod:`fastweight.aggregation.extension` and
``fastweight.kernels.aggregation``) exposes the same three functions with the same contract.
All work on the flattened layout: N tokens, B segments given by ``cu_seqlens``
(int64, (B+1,), non-decreasing from 0 to N) and a bool mask ``valid`` (N,) of the tokens that
count. Inputs may be on any device; outputs are on the inputs' device. None of them syncs.
"""
from __future__ import annotations

import torch
from torch import Tensor


def segment_ids(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """(N,) int64: the segment of each token."""
    lengths = cu_seqlens.diff()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=num_tokens
    )


def _valid_counts(valid: Tensor, cu_seqlens: Tensor, seg: Tensor) -> Tensor:
    num_segments = cu_seqlens.numel() - 1
    counts = torch.zeros(num_segments, dtype=torch.int64, device=cu_seqlens.device)
    return counts.index_add_(0, seg, valid.to(torch.int64))


def coefficients(
    valid: Tensor,
    cu_seqlens: Tensor,
    sample_weights: Tensor | None,
    token_weights: Tensor | None,
    per_sample_mean: bool,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Per-token coefficients before normalisation, and valid-token counts.

    c_t = valid_t * w[s(t)] * u_t, divided by n_s(t) when ``per_sample_mean``.
    Returns (c (N,) fp32, counts (B,) int64). Segments with no valid token give c = 0, not NaN.
    ``dtype`` (this backend only) lets fp64 ground-truth runs keep fp64 coefficients.
    """
    seg = segment_ids(cu_seqlens, valid.numel())
    counts = _valid_counts(valid, cu_seqlens, seg)
    c = valid.to(dtype)
    if sample_weights is not None:
        c = c * sample_weights.to(dtype)[seg]
    if token_weights is not None:
        c = c * token_weights.to(dtype)
    if per_sample_mean:
        c = c / counts.clamp_min(1).to(dtype)[seg]
    return c, counts


def segment_mean(values: Tensor, cu_seqlens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` (N,) over the valid tokens of each segment.

    Returns (means (B,) fp32 (fp64 here for fp64 values), counts (B,) int64); a segment with no valid token has mean 0.
    """
    seg = segment_ids(cu_seqlens, values.numel())
    counts = _valid_counts(valid, cu_seqlens, seg)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    v = torch.where(valid, values.to(acc), 0.0)
    sums = torch.zeros(counts.numel(), dtype=acc, device=values.device).index_add_(0, seg, v)
    return sums / counts.clamp_min(1).to(acc), counts


def segment_mean_backward(
    grad_means: Tensor, cu_seqlens: Tensor, counts: Tensor, valid: Tensor
) -> Tensor:
    """Gradient of ``segment_mean`` w.r.t. its values: (N,) fp32, grad[s(t)] / n_s(t) on valid tokens."""
    seg = segment_ids(cu_seqlens, valid.numel())
    acc = torch.float64 if grad_means.dtype == torch.float64 else torch.float32
    g = (grad_means.to(acc) / counts.clamp_min(1).to(acc))[seg]
    return torch.where(valid, g, 0.0)
