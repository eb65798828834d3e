"""``WeightedCrossEntropy``: the options of ``weighted_ce`` held in an ``nn.Module``."""
from __future__ import annotations

import torch
from torch import Tensor

from fastweight.api import weighted_ce


class WeightedCrossEntropy(torch.nn.Module):
    """Module form of :func:`fastweight.weighted_ce`; the constructor takes its keyword options.

    ``forward(hidden, weight, labels, sample_weights=None, *, token_weights=None, bias=None,
    cu_seqlens=None, num_items=None)``: the per-batch tensors, as in ``weighted_ce``.
    """

    def __init__(self, *, shift: bool = False, ignore_index: int = -100, softcap: float | None = None,
                 label_smoothing: float = 0.0, sample_reduction: str = "token",
                 reduction: str = "mean", impl: str = "auto", chunk_bytes: int | None = None,
                 z_loss: float = 0.0, return_lse: bool = False, return_accuracy: bool = False):
        super().__init__()
        self.options = dict(shift=shift, ignore_index=ignore_index, softcap=softcap,
                            label_smoothing=label_smoothing, sample_reduction=sample_reduction,
                            reduction=reduction, impl=impl, chunk_bytes=chunk_bytes, z_loss=z_loss,
                            return_lse=return_lse, return_accuracy=return_accuracy)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, sample_weights: Tensor | None = None, *,
                token_weights: Tensor | None = None, bias: Tensor | None = None,
                cu_seqlens: Tensor | None = None, num_items=None):
        """The loss of one batch; see :func:`fastweight.weighted_ce` for shapes and options."""
        return weighted_ce(hidden, weight, labels, sample_weights, token_weights=token_weights,
                           bias=bias, cu_seqlens=cu_seqlens, num_items=num_items, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
