"""Chunked linear cross-entropy in plain PyTorch: the CPU path and the GPU fallback.

Tokens are processed a chunk at a time, so only a (chunk, V) block of logits ever exists. The
chunk size comes from a memory budget (``chunk_bytes``, or ``FASTWEIGHT_CHUNK_BYTES``).

Every linear-CE backend (this module and ``fastweight.kernels.linear_ce``) has the same contract:

- ``x`` (N, D) and ``weight`` (V, D) share a float dtype; ``bias`` is (V,) or None.
- ``targets`` (N,) int64 holds the class of each token, or a negative value for a token that
  does not count (ignore_index, shift boundary).
- ``coeff`` (N,) fp32 are the per-token coefficients c of DESIGN.md (0 where targets < 0);
  the gradients returned are those of sum_t c_t * l_t.
- Losses are fp32 (fp64 for fp64 inputs) and 0 where targets < 0; gradients come back in the
  dtypes of x, weight, bias.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

DEFAULT_CHUNK_BYTES = 64 << 20


def chunk_bytes_default() -> int:
    """The working-memory budget per chunk: ``FASTWEIGHT_CHUNK_BYTES`` or 64 MiB."""
    return int(os.environ.get("FASTWEIGHT_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))


def chunk_tokens(num_tokens: int, vocab: int, dtype: torch.dtype, chunk_bytes: int | None,
                 hidden_dim: int = 0) -> int:
    """How many tokens fit the budget: an fp32 logits and an fp32 probability block per token,
    plus a low-precision copy of the gradient block for 16-bit inputs.

    Without a per-call or env budget, it grows from 64 MiB to half the size of an fp32 dW (V * D * 4 / 2) at large vocabularies:
    every chunk re-reads and re-writes dW, so chunks of fewer than ~D/2 tokens make that
    traffic, not the GEMMs, the cost."""
    if chunk_bytes is not None:
        budget = chunk_bytes
    elif "FASTWEIGHT_CHUNK_BYTES" in os.environ:
        budget = chunk_bytes_default()
    else:
        budget = max(DEFAULT_CHUNK_BYTES, vocab * hidden_dim * 2)
    per_token = vocab * (8 + (0 if dtype == torch.float32 or dtype == torch.float64 else 2))
    return max(1, min(max(num_tokens, 1), budget // max(per_token, 1)))


def _logits(x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, out: Tensor) -> Tensor:
    """Capped logits of a chunk, in ``out`` (C, V), accumulated in fp32 or wider."""
    if x.dtype == out.dtype:
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias, x, weight.t(), out=out)
    else:
        out.copy_(torch.nn.functional.linear(x, weight, bias))
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    return out


def _loss_and_probs(z: Tensor, probs: Tensor, targets: Tensor, valid: Tensor, label_smoothing: float):
    """Per-token loss and lse of a chunk; leaves softmax(z) in ``probs``."""
    torch.ops.aten._softmax.out(z, 1, False, out=probs)
    # The largest probability is at least 1/V, so its log is exact enough and never -inf.
    lse = z.amax(1) - probs.amax(1).log()
    z_target = z.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    loss = lse - z_target
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z.mean(1))
    return torch.where(valid, loss, 0.0), lse


def _grad_logits_(probs: Tensor, z: Tensor, targets: Tensor, valid: Tensor, coeff: Tensor,
                  softcap: float | None, label_smoothing: float) -> Tensor:
    """Turn ``probs`` into d(sum c*l)/d(raw logits), in place. Overwrites ``z`` when capped."""
    vocab = probs.shape[1]
    probs.mul_(coeff.unsqueeze(1))
    if label_smoothing:
        probs.sub_((coeff * (label_smoothing / vocab)).unsqueeze(1))
    rows = torch.arange(probs.shape[0], device=probs.device)
    hit = torch.where(valid, coeff * (1.0 - label_smoothing), 0.0)
    probs.index_put_((rows, targets.clamp_min(0)), -hit, accumulate=True)
    if softcap is not None:
        # d(cap * tanh(r / cap))/dr = 1 - tanh^2 = 1 - (z / cap)^2
        probs.mul_(z.div_(softcap).square_().neg_().add_(1.0))
    return probs


def _accumulate_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b for 16-bit a, b and an fp32 acc, without rounding each chunk's partial
    product to 16 bits (that rounding, repeated per chunk, would dominate the dW error)."""
    if acc.is_cuda:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError):  # torch < 2.8 has no out_dtype
            pass
    # The 16-bit operands are exact in fp32, so this matches the mixed-dtype product.
    acc.addmm_(a.float(), b.float())


def _chunk_plain(xc: Tensor, weight: Tensor, bias: Tensor | None, tc: Tensor, coeff: Tensor | None,
                 z: Tensor, grads, start: int, stop: int):
    """The common case (no softcap, no label smoothing, x in the accumulation dtype) with ONE
    (C, V) buffer: exp(z - max) is formed in place and never normalised or scaled; the
    coefficients and 1/sum(exp) are folded into (C, D)-sized operands instead, and the one-hot
    term becomes row gathers/scatters of W and x. Returns the chunk's (loss, lse)."""
    valid = tc >= 0
    yi = tc.clamp_min(0)
    _logits(xc, weight, bias, None, out=z)
    z_target = z.gather(1, yi.unsqueeze(1)).squeeze(1)
    zmax = z.amax(1, keepdim=True)
    z.sub_(zmax).exp_()                                   # z <- exp(z - max), in place
    sumexp = z.sum(1)
    lse = zmax.squeeze(1) + sumexp.log()
    if grads is None:
        return torch.where(valid, lse - z_target, 0.0), lse
    c = torch.where(valid, coeff, 0.0)
    r = (c / sumexp).unsqueeze(1)                         # row scale of softmax * c
    dx, dw, db = grads
    dxc = dx[start:stop]
    torch.mm(z, weight, out=dxc)                          # (exp @ W)
    dxc.mul_(r).sub_(weight.index_select(0, yi) * c.unsqueeze(1))
    dw.addmm_(z.t(), xc * r)                              # softmax.T @ (c x)
    dw.index_add_(0, yi, xc * (-c).unsqueeze(1))          # - onehot.T @ (c x)
    if db is not None:
        db.addmv_(z.t(), r.squeeze(1))
        db.index_add_(0, yi, -c)
    return torch.where(valid, lse - z_target, 0.0), lse


def _run(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coeff: Tensor | None,
         softcap: float | None, label_smoothing: float, chunk_bytes: int | None):
    """One pass over the token chunks: losses always, gradients when ``coeff`` is given."""
    n, d = x.shape
    vocab = weight.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=acc, device=x.device)
    lse = torch.empty(n, dtype=acc, device=x.device)
    grads = None
    if coeff is not None:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dw = torch.zeros(vocab, d, dtype=acc, device=x.device)
        db = torch.zeros(vocab, dtype=acc, device=x.device) if bias is not None else None
        grads = (dx, dw, db)
    step = chunk_tokens(n, vocab, x.dtype, chunk_bytes, d)
    plain = softcap is None and not label_smoothing and x.dtype == acc
    z_buf = torch.empty(min(step, n), vocab, dtype=acc, device=x.device)
    p_buf = None if plain else torch.empty_like(z_buf)
    for start in range(0, n, step):
        stop = min(start + step, n)
        xc, tc = x[start:stop], targets[start:stop]
        if plain:
            cc = None if grads is None else coeff[start:stop].to(acc)
            loss[start:stop], lse[start:stop] = _chunk_plain(
                xc, weight, bias, tc, cc, z_buf[: stop - start], grads, start, stop)
            continue
        z, probs = z_buf[: stop - start], p_buf[: stop - start]
        valid = tc >= 0
        _logits(xc, weight, bias, softcap, out=z)
        lc, sc = _loss_and_probs(z, probs, tc, valid, label_smoothing)
        loss[start:stop], lse[start:stop] = lc, sc
        if grads is None:
            continue
        g = _grad_logits_(probs, z, tc, valid, coeff[start:stop].to(acc), softcap, label_smoothing)
        dx, dw, db = grads
        if g.dtype == x.dtype:
            torch.mm(g, weight, out=dx[start:stop])
            dw.addmm_(g.t(), xc)
        else:
            g_low = g.to(x.dtype)
            dx[start:stop] = g_low @ weight
            _accumulate_fp32_(dw, g_low.t(), xc)
        if db is not None:
            db += g.sum(0)
    if grads is None:
        return loss, lse, None
    dx, dw, db = grads
    return loss, lse, (dx, dw.to(weight.dtype), db.to(bias.dtype) if db is not None else None)


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
            softcap: float | None = None, label_smoothing: float = 0.0,
            chunk_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-token (loss, lse), both (N,) fp32, without the full logits."""
    loss, lse, _ = _run(x, weight, bias, targets, None, softcap, label_smoothing, chunk_bytes)
    return loss, lse


def forward_backward(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coeff: Tensor, *,
                     softcap: float | None = None, label_smoothing: float = 0.0,
                     chunk_bytes: int | None = None):
    """Per-token loss (N,) fp32 and the gradients (dx, dw, db) of sum_t coeff_t * loss_t,
    in one pass over the vocabulary (6*N*D*V flops)."""
    loss, _, (dx, dw, db) = _run(x, weight, bias, targets, coeff, softcap, label_smoothing, chunk_bytes)
    return loss, dx, dw, db


def backward(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coeff: Tensor,
             lse: Tensor, *, softcap: float | None = None, label_smoothing: float = 0.0,
             chunk_bytes: int | None = None):
    """Gradients (dx, dw, db) of sum_t coeff_t * loss_t. ``lse`` is accepted for the shared
    contract; recomputing the softmax here costs no more than reading it back."""
    _, _, grads = _run(x, weight, bias, targets, coeff, softcap, label_smoothing, chunk_bytes)
    return grads
