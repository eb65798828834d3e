"""Chunked linear cross-entropy in plain PyTorch: the CPU path and the GPU fallback.

Tokens are processed a chunk at a time, so only a (chunk, V) block of logits ever exists. The
chunk size comes from a working-memory budget: ``chunk_bytes`` (the call's, or
``FASTWEIGHT_CHUNK_BYTES``, resolved by the ops), else the larger of 64 MiB and V * D * 2 bytes
(see :func:`default_chunk_bytes`).

Contract of every linear-CE backend (this module, :mod:`.reference` and
``fastweight.kernels.linear_ce``): one function,

    linear_ce(x, weight, bias, targets, coeff=None, *, lse=None, softcap=None,
              label_smoothing=0.0, z_loss=0.0, hits=False, chunk_bytes=None,
              needs=(True, True, True))
        -> (loss, lse, hits, grads)

- ``x`` (N, D) and ``weight`` (V, D) share a float dtype; ``bias`` is (V,) or None.
- ``targets`` (N,) int64: -1 for a token that does not count, [0, V) a class, V an invalid
  label (its loss and gradient are NaN; :mod:`fastweight.layout`).
- ``loss`` and ``lse`` (N,) are fp32 (fp64 for fp64 inputs), 0 where targets < 0. The loss of
  a token is (1 - e) * (lse - z_y) + e * (lse - mean(z)) + z_loss * lse^2 (e the smoothing).
  With a saved ``lse`` given, a backend may skip the loss (``loss`` is then None).
- ``hits`` (N,) bool, when asked for (and no ``lse`` given): whether z_y is the row's maximum,
  False where targets < 0 or invalid; else None.
- With ``coeff`` (N,) (the per-token coefficients c of DESIGN.md), ``grads`` = (dx, dw, db) of
  sum_t c_t * l_t in the dtypes of x, weight, bias; an entry is None where ``needs`` says it
  is not wanted (a frozen LM head computes no dW at all), and db is None without bias.
  Without ``coeff``, ``grads`` is None: forward only.

and ``scale_(t, s) -> t``: ``t *= s`` in place for a 0-d tensor ``s`` (the upstream gradient of
a mean or sum loss, applied to the gradients ``linear_ce`` already formed), rounded as
``t.mul_(s.to(t.dtype))``. A backend may skip the pass over ``t`` when ``s == 1``, but never
with a host synchronisation (the Triton backend tests ``s`` on the device).
"""
from __future__ import annotations

import torch
from torch import Tensor

MIN_CHUNK_BYTES = 64 << 20


def scale_(t: Tensor, s: Tensor) -> Tensor:
    """``t *= s`` in place (see the contract above)."""
    return t.mul_(s.to(t.dtype))


def default_chunk_bytes(vocab: int, hidden_dim: int) -> int:
    """The larger of 64 MiB and V * D * 2 bytes (half an fp32 dW): every chunk re-reads and
    re-writes dW, so chunks of fewer than ~D/2 tokens make that traffic, not the GEMMs, the cost."""
    return max(MIN_CHUNK_BYTES, vocab * hidden_dim * 2)


def chunk_tokens(num_tokens: int, vocab: int, hidden_dim: int, dtype: torch.dtype, chunk_bytes: int | None) -> int:
    """How many tokens fit the budget: an fp32 logits and an fp32 probability block per token,
    plus a low-precision copy of the gradient block for 16-bit inputs."""
    budget = chunk_bytes if chunk_bytes is not None else default_chunk_bytes(vocab, hidden_dim)
    per_token = vocab * (8 + (0 if dtype in (torch.float32, torch.float64) else 2))
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


def _softmax_and_lse(z: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """Leaves softmax(z) in ``probs``; returns the lse and the max of each row."""
    torch.ops.aten._softmax.out(z, 1, False, out=probs)
    z_max = z.amax(1)
    # The largest probability is at least 1/V, so its log is exact enough and never -inf.
    return z_max - probs.amax(1).log(), z_max


def _token_loss(z: Tensor, lse: Tensor, target_logit: Tensor, label_smoothing: float, z_loss: float) -> Tensor:
    loss = lse - target_logit
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z.mean(1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    return loss


def _softmax_coefficient(coeff: Tensor, lse: Tensor, z_loss: float) -> Tensor:
    """The softmax term's coefficient: d(z_loss * lse^2)/dz = 2 z_loss lse softmax(z) adds to it."""
    return coeff * (1.0 + 2.0 * z_loss * lse) if z_loss else coeff


def _grad_logits_(probs: Tensor, z: Tensor, classes: Tensor, coeff: Tensor, softmax_coeff: Tensor,
                  softcap: float | None, label_smoothing: float) -> Tensor:
    """Turn ``probs`` into d(sum c*l)/d(raw logits), in place. Overwrites ``z`` when capped.
    ``coeff`` is 0 on ignored rows, so their one-hot term vanishes with it."""
    vocab = probs.shape[1]
    probs.mul_(softmax_coeff.unsqueeze(1))
    if label_smoothing:
        probs.sub_((coeff * (label_smoothing / vocab)).unsqueeze(1))
    rows = torch.arange(probs.shape[0], device=probs.device)
    probs.index_put_((rows, classes), -coeff * (1.0 - label_smoothing), accumulate=True)
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


class _Gradients:
    """The gradient accumulators of one call; an entry is None where it is not needed."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype, needs):
        need_x, need_w, need_b = needs
        self.dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        self.dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
        self.db = torch.zeros(weight.shape[0], dtype=acc, device=x.device) if need_b and bias is not None else None

    def add_plain(self, xc: Tensor, weight: Tensor, exp_z: Tensor, row_scale: Tensor, classes: Tensor,
                  coeff: Tensor, start: int, stop: int) -> None:
        """The one-buffer case: the softmax is ``exp_z * row_scale``; the coefficients and the
        one-hot term are applied to (C, D) operands, never to the (C, V) block."""
        if self.dx is not None:
            dxc = self.dx[start:stop]
            torch.mm(exp_z, weight, out=dxc)                              # (exp @ W)
            dxc.mul_(row_scale).sub_(weight.index_select(0, classes) * coeff.unsqueeze(1))
        if self.dw is not None:
            self.dw.addmm_(exp_z.t(), xc * row_scale)                      # softmax.T @ (c x)
            self.dw.index_add_(0, classes, xc * (-coeff).unsqueeze(1))    # - onehot.T @ (c x)
        if self.db is not None:
            self.db.addmv_(exp_z.t(), row_scale.squeeze(1))
            self.db.index_add_(0, classes, -coeff)

    def add(self, xc: Tensor, weight: Tensor, grad_logits: Tensor, start: int, stop: int) -> None:
        """Accumulate the chunk's gradient of the logits, (C, V) in the accumulation dtype."""
        low = grad_logits if grad_logits.dtype == xc.dtype else grad_logits.to(xc.dtype)
        if self.dx is not None:
            torch.mm(low, weight, out=self.dx[start:stop])
        if self.dw is not None:
            if low is grad_logits:
                self.dw.addmm_(low.t(), xc)
            else:
                _accumulate_fp32_(self.dw, low.t(), xc)
        if self.db is not None:
            self.db += grad_logits.sum(0)

    def result(self, weight: Tensor, bias: Tensor | None):
        return (self.dx, None if self.dw is None else self.dw.to(weight.dtype),
                None if self.db is None else self.db.to(bias.dtype))


def linear_ce(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coeff: Tensor | None = None, *,
              lse: Tensor | None = None, softcap: float | None = None, label_smoothing: float = 0.0,
              z_loss: float = 0.0, hits: bool = False, chunk_bytes: int | None = None,
              needs: tuple[bool, bool, bool] = (True, True, True)):
    """The linear-CE contract (module docstring): (loss, lse, hits, grads), one pass over the chunks.

    With a saved ``lse`` the softmax is exp(z - lse) directly (no max or sum over the block)
    and the loss is not recomputed (None)."""
    n, d = x.shape
    vocab = weight.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss_out = None if lse is not None else torch.empty(n, dtype=acc, device=x.device)
    lse_out = torch.empty(n, dtype=acc, device=x.device) if lse is None else lse.to(acc)
    hits_out = torch.empty(n, dtype=torch.bool, device=x.device) if hits and lse is None else None
    grads = _Gradients(x, weight, bias, acc, needs) if coeff is not None else None
    step = chunk_tokens(n, vocab, d, x.dtype, chunk_bytes)
    plain = softcap is None and not label_smoothing and x.dtype == acc
    z_buf = torch.empty(min(step, n), vocab, dtype=acc, device=x.device)
    p_buf = None if plain else torch.empty_like(z_buf)
    for start in range(0, n, step):
        stop = min(start + step, n)
        xc, tc = x[start:stop], targets[start:stop]
        valid, invalid = tc >= 0, tc >= vocab
        classes = tc.clamp(0, vocab - 1)            # a row is never read outside [0, V)
        c = None
        if grads is not None:
            c = torch.where(valid, coeff[start:stop].to(acc), 0.0).masked_fill(invalid, float("nan"))
        z = _logits(xc, weight, bias, softcap, out=z_buf[: stop - start])
        if lse is not None:  # ignored rows: exp(z - inf) = 0, never an overflow
            saved_lse = lse_out[start:stop]
            lse_c = torch.where(valid, saved_lse, float("inf"))
        if plain:
            if lse is None:
                target_logit = z.gather(1, classes.unsqueeze(1)).squeeze(1)  # before z is overwritten
                z_max = z.amax(1, keepdim=True)
                z.sub_(z_max).exp_()                  # z <- exp(z - max), in place
                sum_exp = z.sum(1)
                z_max = z_max.squeeze(1)
                lse_c = z_max + sum_exp.log()
                row_scale = None if c is None else _softmax_coefficient(c, lse_c, z_loss) / sum_exp
            else:
                z.sub_(lse_c.unsqueeze(1)).exp_()     # z <- softmax
                row_scale = None if c is None else _softmax_coefficient(c, saved_lse, z_loss)
            if grads is not None:
                grads.add_plain(xc, weight, z, row_scale.unsqueeze(1), classes, c, start, stop)
        else:
            probs = p_buf[: stop - start]
            if lse is None:
                lse_c, z_max = _softmax_and_lse(z, probs)
                target_logit = z.gather(1, classes.unsqueeze(1)).squeeze(1)
                loss_c = _token_loss(z, lse_c, target_logit, label_smoothing, z_loss)
            else:
                torch.sub(z, lse_c.unsqueeze(1), out=probs).exp_()
            if grads is not None:
                finite_lse = lse_c if lse is None else saved_lse
                grads.add(xc, weight, _grad_logits_(probs, z, classes, c, _softmax_coefficient(c, finite_lse, z_loss),
                                                    softcap, label_smoothing), start, stop)
        if lse is None:
            if plain:
                loss_c = _token_loss(z, lse_c, target_logit, 0.0, z_loss)
            if hits_out is not None:
                hits_out[start:stop] = valid & ~invalid & (target_logit >= z_max)
            loss_out[start:stop] = torch.where(valid, loss_c, 0.0).masked_fill(invalid, float("nan"))
            lse_out[start:stop] = torch.where(valid, lse_c, 0.0)
    return loss_out, lse_out, hits_out, None if grads is None else grads.result(weight, bias)
