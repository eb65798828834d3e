"""The loss-aggregation op: per-token coefficients from sample and token weights, and
per-sequence means over packed tokens.

Its home holds the contract (:mod:`.reference`, the PyTorch composition and ground truth),
the custom ops (:mod:`.ops`) and the C++/CUDA backend's wrapper (:mod:`.extension`); the Triton
kernels are in ``fastweight.kernels.aggregation`` and the C++/CUDA sources in ``csrc/``.

Every backend works on the flat layout: N tokens, B segments given by ``cu_seqlens``
(int64, (B+1,), non-decreasing from 0 to N) and a bool mask ``valid`` (N,) of the tokens that
count. None of them syncs with the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastweight import layout, validation
from fastweight.aggregation import ops

SAMPLE_REDUCTIONS = ("token", "mean")


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
    validation.int_tensor("labels", labels)
    validation.choice("sample_reduction", sample_reduction, SAMPLE_REDUCTIONS)
    validation.choice("reduction", reduction, ("mean", "sum"))
    validation.num_items_type(num_items)
    validation.check_values(labels, None, ignore_index, cu_seqlens, labels.numel(),
                            {"sample_weights": sample_weights, "token_weights": token_weights}, num_items)
    # A zero-width stand-in for hidden lets the shared layout code resolve rows and packing.
    ghost = labels.new_empty(*labels.shape, 0, dtype=torch.float32)
    flat = layout.flatten(ghost, labels, cu_seqlens, token_weights, shift, ignore_index, vocab=None)
    return ops.normalised_coefficients(flat.valid, flat.cu_seqlens,
                                       None if sample_weights is None else sample_weights.detach(),
                                       None if flat.token_weights is None else flat.token_weights.detach(),
                                       sample_reduction, reduction, num_items)


def segment_mean(values: Tensor, cu_seqlens: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean of ``values`` (N,) over each segment's valid tokens: (B,) fp32 (fp64 for fp64
    values), 0 for a segment with none. Differentiable with respect to ``values``.

    cu_seqlens: (B+1,) integer, non-decreasing from 0 to N; valid: (N,) bool or None (all).
    """
    validation.float_tensor("values", values)
    validation.int_tensor("cu_seqlens", cu_seqlens)
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
    validation.check_values(None, None, 0, cu, values.numel(), {})
    return ops.segment_mean(values, cu, valid)[0]
