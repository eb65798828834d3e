"""From the user's layout ((B, T, D) rows, or packed (N, D) with cu_seqlens) to the flat one
that every backend sees: x (N, D), targets (N,) and cu_seqlens (B+1,). Shift is index
arithmetic on the labels: hidden is never copied.

The targets every linear-CE backend receives:
- -1: an ignored token (ignore_index, or the last token of a sequence under shift): loss 0,
  no gradient, not counted;
- 0 <= y < V: the class;
- V: an invalid label (outside [0, V) and not ignore_index) that reached a backend because the
  value checks were off or torch.compile was tracing. Its loss is NaN, so a mean over it is NaN
  too: the error shows without a host sync, as PyTorch's CUDA cross-entropy shows it. No
  backend reads a logit outside its row for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FlatBatch:
    x: Tensor                    # (N, D), hidden's dtype
    targets: Tensor              # (N,) int64: -1 ignored, [0, V) class, V invalid
    valid: Tensor                # (N,) bool: the tokens that count (targets >= 0)
    cu_seqlens: Tensor           # (B+1,) int64
    token_weights: Tensor | None  # (N,), aligned with targets
    shape: torch.Size            # labels' shape, for per-token outputs


def _shift_left(t: Tensor, last: Tensor, fill) -> Tensor:
    """t[i+1] at position i, ``fill`` at each sequence's last position."""
    return torch.where(last, fill, t.roll(-1))


def flatten(hidden: Tensor, labels: Tensor, cu_seqlens: Tensor | None,
            token_weights: Tensor | None, shift: bool, ignore_index: int, vocab: int | None) -> FlatBatch:
    """Flatten and resolve shift/ignore_index; with ``vocab``, mark invalid labels as ``vocab``.
    Shapes are assumed validated."""
    n, d = labels.numel(), hidden.shape[-1]
    x = hidden.reshape(n, d)
    if not x.is_contiguous():
        x = x.contiguous()
    labels_flat = labels.reshape(-1).to(torch.int64)
    token_weights_flat = token_weights.reshape(-1) if token_weights is not None else None
    device = hidden.device
    if hidden.dim() == 3:
        b, t = hidden.shape[:2]
        cu = torch.arange(0, b + 1, device=device, dtype=torch.int64) * t
    elif cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
    else:
        cu = torch.tensor([0, n], device=device, dtype=torch.int64)
    if shift and n:
        # Mark each non-empty sequence's last token; empty ones write to a spare slot.
        ends = torch.where(cu[1:] > cu[:-1], cu[1:] - 1, n)
        last = torch.zeros(n + 1, dtype=torch.bool, device=device).index_fill_(0, ends, True)[:n]
        labels_flat = _shift_left(labels_flat, last, ignore_index)
        if token_weights_flat is not None:
            token_weights_flat = _shift_left(token_weights_flat, last, 0.0)
    valid = labels_flat != ignore_index
    if vocab is not None:
        labels_flat = torch.where((labels_flat < 0) | (labels_flat >= vocab), vocab, labels_flat)
    targets = torch.where(valid, labels_flat, -1)
    return FlatBatch(x, targets, valid, cu, token_weights_flat, labels.shape)
