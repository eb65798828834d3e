"""The materialised linear cross-entropy: full (N, V) logits and autograd. The ground truth.

Run in float64 it is the reference of every test; run in a 16-bit dtype it is the "naive"
baseline whose own error sets the tolerance of the fast paths (DESIGN.md, testing rules).
It is also the ``impl="reference"`` backend (the contract of :mod:`.chunked`), which "auto"
never picks: it builds the whole (N, V) logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastweight.linear_ce.chunked import scale_  # noqa: F401 - the contract's in-place scaling


def logits(x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """The (N, V) logits, computed in the input dtype (as a naive implementation would), then
    capped in fp32 (fp64 for fp64 inputs)."""
    z = F.linear(x, weight, bias).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def token_losses(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                 softcap: float | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0) -> Tensor:
    """Per-token loss (N,), differentiable, 0 where targets < 0, NaN where targets >= V.

    The logits are computed in the input dtype (as a naive implementation would), then the
    loss in fp32, or fp64 for fp64 inputs.
    """
    z = logits(x, weight, bias, softcap)
    logp = torch.log_softmax(z, dim=-1)
    classes = targets.clamp(0, weight.shape[0] - 1)
    nll = -logp.gather(1, classes.unsqueeze(1)).squeeze(1)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    if z_loss:
        nll = nll + z_loss * torch.logsumexp(z, dim=-1).square()
    nll = torch.where(targets >= 0, nll, torch.zeros_like(nll))
    return torch.where(targets >= weight.shape[0], torch.full_like(nll, float("nan")), nll)


def linear_ce(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coeff: Tensor | None = None, *,
              lse: Tensor | None = None, softcap: float | None = None, label_smoothing: float = 0.0,
              z_loss: float = 0.0, hits: bool = False, chunk_bytes: int | None = None,
              needs: tuple[bool, bool, bool] = (True, True, True)):
    """The linear-CE contract on the materialised logits; gradients by ``torch.func.vjp`` (it
    works inside a custom op, where autograd does not record). ``lse`` is not needed
    (everything is recomputed); ``chunk_bytes`` cannot be honoured and raises."""
    if chunk_bytes is not None:
        raise ValueError("`chunk_bytes` cannot be honoured by impl='reference': it materialises the "
                         "whole (N, V) logits")
    # Differentiate only what is needed: a frozen head gets no dW computed at all.
    inputs = [x, weight, bias]
    wanted = [i for i in range(3) if inputs[i] is not None and coeff is not None and needs[i]]

    def losses(*differentiated):
        args = list(inputs)
        for i, t in zip(wanted, differentiated):
            args[i] = t
        return token_losses(*args, targets, softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss)

    loss, pullback = torch.func.vjp(losses, *(inputs[i] for i in wanted))
    z = logits(x, weight, bias, softcap)
    valid = (targets >= 0) & (targets < weight.shape[0])
    lse_out = torch.where(targets >= 0, torch.logsumexp(z, dim=-1), 0.0)
    hits_out = None
    if hits:
        target_logit = z.gather(1, targets.clamp(0, weight.shape[0] - 1).unsqueeze(1)).squeeze(1)
        hits_out = valid & (target_logit >= z.amax(1))
    if coeff is None:
        return loss, lse_out, hits_out, None
    grads: list[Tensor | None] = [None, None, None]
    for i, grad in zip(wanted, pullback(coeff.to(loss.dtype))):
        grads[i] = grad
    return loss, lse_out, hits_out, tuple(grads)
