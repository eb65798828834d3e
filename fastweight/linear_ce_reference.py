"""The materialised linear cross-entropy: full (N, V) logits and autograd. The ground truth.

Run in float64 it is the reference of every test; run in a 16-bit dtype it is the "naive"
baseline whose own error sets the tolerance of the fast paths (DESIGN.md, testing rules).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_losses(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                 softcap: float | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Per-token loss (N,), differentiable, 0 where targets < 0.

    The logits are computed in the input dtype (as a naive implementation would), then the
    loss in fp32, or fp64 for fp64 inputs.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = F.linear(x, weight, bias).to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = targets >= 0
    nll = -logp.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return torch.where(valid, nll, torch.zeros_like(nll))
