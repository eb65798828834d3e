"""From the user's layout ((B, T, D) rows, or packed (N, D) with cu_seqlens) to the flat one
that every backend sees: x (N, D), targets (N,) with negatives for tokens that do not count,
and cu_seqlens (B+1,). Shift is index arithmetic on the labels: hidden is never copied."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FlatBatch:
    x: Tensor                    # (N, D), hidden's dtype
    targets: Tensor              # (N,) int64, negative = ignored
    valid: Tensor                # (N,) bool
    cu_seqlens: Tensor           # (B+1,) int64
    token_weights: Tensor | None  # (N,), aligned with targets
    shape: torch.Size            # labels' shape, for per-token outputs


def _shift_left(t: Tensor, last: Tensor, fill) -> Tensor:
    """t[i+1] at position i, ``fill`` at each sequence's last position."""
    return torch.where(last, fill, t.roll(-1))


def flatten(hidden: Tensor, labels: Tensor, cu_seqlens: Tensor | None,
            token_weights: Tensor | None, shift: bool, ignore_index: int) -> FlatBatch:
    """Flatten and resolve shift/ignore_index. Inputs are assumed validated."""
    n, d = labels.numel(), hidden.shape[-1]
    x = hidden.reshape(n, d)
    if not x.is_contiguous():
        x = x.contiguous()
    lab = labels.reshape(-1).to(torch.int64)
    tw = token_weights.reshape(-1) if token_weights is not None else None
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
        lab = _shift_left(lab, last, ignore_index)
        if tw is not None:
            tw = _shift_left(tw, last, 0.0)
    valid = (lab != ignore_index) & (lab >= 0)
    targets = torch.where(valid, lab, -1)
    return FlatBatch(x, targets, valid, cu, tw, labels.shape)
